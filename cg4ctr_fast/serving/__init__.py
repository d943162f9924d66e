"""cg4ctr_fast.serving"""
