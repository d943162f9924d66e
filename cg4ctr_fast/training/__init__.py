"""cg4ctr_fast.training"""
