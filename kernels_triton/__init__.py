"""Triton programs for the KDA forward stages and decode (installed as ``kda_compile.kernels_triton``).

One file per stage, named as its TileLang twin in ``kda_compile.kernels_tl``.  The ``triton`` backend
registers itself with :mod:`kda_compile.dispatch` here once the kernels exist and Triton can run them.
"""
