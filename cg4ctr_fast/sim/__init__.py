"""cg4ctr_fast.sim"""
