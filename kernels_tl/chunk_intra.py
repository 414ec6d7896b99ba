"""Stage 1 of the chunkwise forward: everything that stays inside one chunk (design.md section 1).

(stub: being written)
"""
