"""cg4ctr_fast.runtime"""
