"""TileLang programs for the KDA chunkwise forward and decode (installed as ``kda_compile.kernels_tl``).

One file per stage, with the stems of the Triton twins in ``kda_compile.kernels_triton`` (docs/algorithm.md
lists the stages):

    gate.py            fused prologues (KDA gate, q/k L2 norm, beta sigmoid) as expression builders
    chunk_intra.py     stage 1, intra: Gamma, A_kk, aqk, the inverse, w, u, qg, kg, gc (one kernel)
    chunk_state.py     stages 2 and 3, state and output, fused in one kernel
    chunk_fwd.py       host side of the forward: the stages in order
    fused_recurrent.py decode kernels (state in/out, state pool, in-place update)
    config.py          the typed kernel configs and their defaults
    target.py          target aliases (GPU vs TileLang's C target), compile cache, CUDA lowering check
    backend.py         the ``tilelang`` backend; registers it with the dispatch

Importing ``backend`` registers the backend; if TileLang cannot be imported, :mod:`kda_compile.dispatch`
records the import error instead (``kda_compile.explain`` and ``python -m kda_compile info`` show it).
"""
