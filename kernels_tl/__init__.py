"""TileLang programs for the KDA chunkwise forward and decode (installed as ``kda_compile.kernels_tl``).

One file per stage, named as its Triton twin in ``kda_compile.kernels_triton``:

    target.py          target aliases (GPU vs TileLang's C target), compile cache, CUDA lowering check
    gate.py            fused prologues (KDA gate, q/k L2 norm, beta sigmoid) as expression builders
    chunk_intra.py     stage 1: per chunk, A_kk / A_qk, (I + A_kk)^-1, w, u, decayed q and k
    chunk_state.py     stage 2: inter-chunk state recurrence fused with the output
    chunk_fwd.py       host side of the chunkwise forward (chunk tables, launches)
    fused_recurrent.py decode kernel (state in/out, state pool, in-place update)
    backend.py         the ``tilelang`` dispatch backend

Importing this package registers the backend after ``triton`` and ahead of ``reference`` in the default
order (on the H100 the Triton forward measured faster, bench/RESULTS.md; the tuned tables decide per shape);
if TileLang cannot be imported, the reason is recorded instead (``kda_compile.explain`` shows it).
"""
from ..dispatch import mark_unavailable, register_backend

try:
    from .backend import TILELANG
except Exception as exc:  # TileLang missing or broken: degrade to the next backend, say why
    mark_unavailable("tilelang", f"TileLang could not be imported: {type(exc).__name__}: {exc}")
else:
    register_backend(TILELANG, before="reference")
