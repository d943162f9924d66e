"""cg4ctr_fast.kernels"""
