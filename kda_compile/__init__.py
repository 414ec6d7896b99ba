"""kda_compile: compiler-driven, portable Kimi Delta Attention.

Public API (the signatures of flash-linear-attention's ``fla.ops.kda``; the math is in docs/algorithm.md)::

    from kda_compile import chunk_kda, fused_recurrent_kda, explain
    o, final_state = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    print(explain(q, k, v, g, beta))   # which backend runs this call, and why

Backends: ``reference`` (PyTorch, any device) always; ``tilelang`` and ``triton`` register themselves when
their kernels can run here.  ``python -m kda_compile demo`` runs a small end-to-end check.
"""
from .api import chunk_kda, explain, fused_recurrent_kda
from .dispatch import backends
from .reference import KDAOptions, kda_reference

__version__ = "0.1.0"
__all__ = ["chunk_kda", "fused_recurrent_kda", "explain", "backends", "kda_reference", "KDAOptions", "__version__"]
