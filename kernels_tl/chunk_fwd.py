"""Host side of the chunkwise forward: chunk tables for ragged/varlen input and the two kernel launches.

(stub: being written)
"""
