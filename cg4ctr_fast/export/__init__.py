"""cg4ctr_fast.export"""
