"""cg4ctr_fast.cli"""
