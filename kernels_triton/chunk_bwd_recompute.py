"""Stage 0 of the Triton backward: the forward's per-chunk intermediates, recomputed by the forward's own kernels.

The forward stores nothing for the backward; this is the one place that calls the forward's stages (intra and
state), so a change in how the forward splits into kernels only touches :func:`recompute_forward`.  What the backward
kernels read (conventions of docs/algorithm.md, flat token axis):

    gamma  [chunks, HV, C, KP] float32   Gamma, chunk-local cumulative log decay (a strided view of the scratch)
    x      [chunks, HV, C, C]  float32   X = (I + A_kk)^-1, A_kk = diag(beta) A0 (a strided view, where the
                                         forward keeps A_kk)
    aqk    [TT, HV, C]  scale * A_qk (causal), v's dtype
    w      [TT, HV, K]  W = T (k exp(Gamma)), k's dtype;     qg, kg as the forward's
    gc     [chunks, HV, K] float32   Gamma at each chunk's last row
    h      [chunks, HV, K, V]        state entering each chunk (k's dtype);  v_new [TT, HV, V]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .chunk_intra import chunk_intra
from .chunk_state import chunk_state


@dataclass
class ForwardIntermediates:
    """What the backward reads of the forward (module docstring)."""

    gamma: torch.Tensor
    x: torch.Tensor
    aqk: torch.Tensor
    w: torch.Tensor
    qg: torch.Tensor
    kg: torch.Tensor
    gc: torch.Tensor
    h: torch.Tensor
    v_new: torch.Tensor


def recompute_forward(q, k, v, g, beta, initial_state, A_log, dt_bias, opts, table, cfg) -> ForwardIntermediates:
    """Run the forward's intra stage and state recurrence on flat tensors (``cfg`` the forward's
    :class:`config.ChunkConfig`), keeping Gamma and X = (I + A_kk)^-1 from the intra stage's scratch (its solve
    kernel stores X there, so the backward does not invert again)."""
    intra = chunk_intra(q, k, v, g, beta, A_log, dt_bias, opts, table, cfg, store_inverse=True)
    h, v_new, _ = chunk_state(intra.kg, intra.w, intra.u, intra.gc, initial_state, table, opts.state_v_first, False,
                              cfg)
    return ForwardIntermediates(intra.gamma, intra.akk, intra.aqk, intra.w, intra.qg, intra.kg, intra.gc,
                                h, v_new)
