"""Decode kernel: the token recurrence for a few tokens per sequence, state in/out (optionally in place).

(stub: being written)
"""
