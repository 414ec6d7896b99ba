"""TileLang programs for the KDA chunkwise forward and decode (installed as ``kda_compile.kernels_tl``).

One file per stage, named as its Triton twin in ``kda_compile.kernels_triton``.  The ``tilelang`` backend
registers itself with :mod:`kda_compile.dispatch` here once the kernels exist and TileLang can run them.
"""
