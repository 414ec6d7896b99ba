"""Triton programs for the KDA chunkwise forward and decode (installed as ``kda_compile.kernels_triton``).

One file per stage, with the stems of the TileLang twins in ``kda_compile.kernels_tl`` (docs/algorithm.md
lists the stages):

    gate.py            prologue helpers fused into the kernels (gate, chunk-local cumsum, beta, masks)
    chunk_intra.py     stage 1, intra: Gamma, A_kk, aqk, the inverse, w, u, qg, kg, gc (three kernels)
    solve_tril.py      the blocked triangular inverse used by chunk_intra's solve kernel
    chunk_state.py     stage 2, state: inter-chunk state recurrence
    chunk_o.py         stage 3, output
    chunk_fwd.py       host side of the forward: the stages in order
    fused_recurrent.py decode kernel (few tokens, state pool, speculative decoding, in-place update)
    config.py          the typed kernel configs and their defaults
    backend.py         the ``triton`` backend: supports / run / configs; registers it with the dispatch

Importing ``backend`` registers the backend; if Triton cannot import, :mod:`kda_compile.dispatch` records why
and ``import kda_compile`` still works.  Kernel configs are passed explicitly (no ``@triton.autotune``).
"""
