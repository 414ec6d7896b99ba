"""TileLang programs for the KDA chunkwise forward and decode (installed as ``kda_compile.kernels_tl``).

One file per stage, with the stems of the Triton twins in ``kda_compile.kernels_triton`` (docs/algorithm.md
lists the stages):

    gate.py            fused prologues (KDA gate, q/k L2 norm, beta sigmoid) as expression builders
    chunk_fused.py     the fused chunkwise forward: every stage of every chunk in one kernel, state on chip
    fused_intra.py     its on-chip intra-chunk steps (Gamma, A_kk / A_qk by causal first-row factoring, inverse)
    segment_scan.py    the segment scan's scan and fix-up kernels (sequence split across the GPU)
    segments.py        the segment table and the three passes of the split as callables on flat tensors
    chunk_fwd.py       host side of the forward: pass 1, and scan + fix-up when a sequence is split
    fused_recurrent.py decode kernels (state in/out, state pool, in-place update)
    config.py          the typed kernel configs and their defaults
    target.py          target aliases (GPU vs TileLang's C target), compile cache, CUDA lowering check
    backend.py         the ``tilelang`` backend; registers it with the dispatch

Importing ``backend`` registers the backend; if TileLang cannot be imported, :mod:`kda_compile.dispatch`
records the import error instead (``kda_compile.explain`` and ``python -m kda_compile info`` show it).
"""
