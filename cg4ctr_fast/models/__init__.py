"""cg4ctr_fast.models"""
