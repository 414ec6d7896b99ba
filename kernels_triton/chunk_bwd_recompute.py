"""Stage 0 of the Triton backward: the forward's per-chunk intermediates, recomputed by the forward's own kernels.

This is the one place that calls the forward's stages (intra and state), so a change in how the forward splits into
kernels only touches :func:`recompute_forward`.  A training forward may have kept X and aqk
(:class:`chunk_intra.Kept`); then A_kk, aqk and the inverse are not formed again.  What the backward kernels read
(conventions of docs/algorithm.md, flat token axis):

    gamma  [chunks, HV, C, KP] float32   Gamma, chunk-local cumulative log decay (a strided view of the scratch)
    x      [TT, HV, C]  float32   X = (I + A_kk)^-1, A_kk = diag(beta) A0, row r of a chunk at its token r
    aqk    [TT, HV, C]  scale * A_qk (causal), v's dtype
    w      [TT, HV, K]  W = T (k exp(Gamma)), k's dtype;     qg, kg as the forward's
    gc     [chunks, HV, K] float32   Gamma at each chunk's last row
    h      [chunks, HV, K, V]        state entering each chunk (k's dtype);  v_new [TT, HV, V]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .chunk_intra import Kept, chunk_intra
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


def recompute_forward(q, k, v, g, beta, initial_state, A_log, dt_bias, opts, table, cfg,
                      kept: Kept | None = None) -> ForwardIntermediates:
    """Run the forward's intra stage and state recurrence on flat tensors (``cfg`` the forward's
    :class:`config.ChunkConfig`), keeping Gamma and X = (I + A_kk)^-1 (the solve kernel stores X, so the backward
    does not invert again); with ``kept`` (a training forward's X and aqk) only Gamma, qg, kg, w, u and the states
    are computed."""
    intra = chunk_intra(q, k, v, g, beta, A_log, dt_bias, opts, table, cfg, keep_x=True, kept=kept)
    h, v_new, _ = chunk_state(intra.kg, intra.w, intra.u, intra.gc, initial_state, table, opts.state_v_first, False,
                              cfg)
    return ForwardIntermediates(intra.gamma, intra.x, intra.aqk, intra.w, intra.qg, intra.kg, intra.gc,
                                h, v_new)
