"""Triton programs for the KDA forward stages and decode (installed as ``kda_compile.kernels_triton``).

One file per stage, named as its TileLang twin in ``kda_compile.kernels_tl``:

    gate.py               prologues (q/k L2 norm, gate + chunk-local cumsum, beta activation), fused helpers
    chunk_intra.py        A_kk, A_qk, inverse, W, U (stage 1; "rows" organisation, the stage's host launch)
    chunk_intra_fused.py  stage 1, "fused" organisation (config intra_impl="fused")
    chunk_intra_split.py  stage 1, "split" organisation: three smaller kernels (config intra_impl="split")
    chunk_intra_split2.py stage 1, "split2" organisation (the default): split with qg/kg/ke written by its
                          A kernel, so its solve kernel reads neither Gamma nor k
    solve_tril.py         the blocked triangular inverse used by stage 1
    chunk_state.py        inter-chunk state recurrence (stage 2)
    chunk_o.py            output (stage 3)
    chunk_fwd.py          host side: chunk table, launches, default config and config space
    fused_recurrent.py    decode kernel (few tokens, state pool, speculative decoding, in-place update)
    backend.py            the ``triton`` Backend: supports / run / configs

Importing this package registers the ``triton`` backend with :mod:`kda_compile.dispatch` (before the
reference).  If Triton cannot import, the backend is marked unavailable with the reason and
``import kda_compile`` still works.  Kernel configs are passed explicitly by ``Backend.run(call, config)``
(no ``@triton.autotune``); ``configs(call)`` lists each stage's ``get_configs()`` for the autotuner.
"""
from __future__ import annotations

from kda_compile import dispatch

try:
    import triton  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the platform
    dispatch.mark_unavailable("triton", f"triton could not import: {type(exc).__name__}: {exc}")
else:
    from . import backend  # noqa: F401  (registers the ``triton`` backend)
