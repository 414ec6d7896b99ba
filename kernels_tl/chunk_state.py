"""Stage 2 of the chunkwise forward: the inter-chunk state recurrence fused with the output.

(stub: being written)
"""
