"""Stage 0 of the Triton backward: the forward's per-chunk intermediates, recomputed by the forward's own kernels.

The forward stores nothing for the backward; this is the one place that calls the forward's host functions
(the "split3" intra stage and the state recurrence), so a change of the forward's organisation only touches
:func:`recompute_forward`.  What the backward kernels read (conventions of the forward, flat token axis):

    gamma  [chunks, HV, C, KP] float32   Gamma, chunk-local cumulative log decay (a strided view)
    akk    [chunks, HV, C, C]  float32   A_kk = diag(beta) A0, strictly lower, zeros elsewhere (a strided view)
    aqk    [TT, HV, C]  scale * A_qk (causal), v's dtype
    w      [TT, HV, K]  W = T (k exp(Gamma)), k's dtype;     qg, kg as the forward's
    gl     [chunks, HV, K] float32   Gamma_C
    h      [chunks, HV, K, V]        state entering each chunk (k's dtype);  v_new [TT, HV, V]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from . import chunk_state
from .chunk_intra_split3 import launch_split3

BLOCK = 16  # diagonal sub-block of the forward's inverse: its scratch keeps [C, 16] floats after A_kk


@dataclass
class ForwardIntermediates:
    """What the backward reads of the forward (module docstring)."""

    gamma: torch.Tensor
    akk: torch.Tensor
    aqk: torch.Tensor
    w: torch.Tensor
    qg: torch.Tensor
    kg: torch.Tensor
    gl: torch.Tensor
    h: torch.Tensor
    v_new: torch.Tensor


def recompute_forward(q, k, v, g, beta, initial_state, A_log, dt_bias, opts, table,
                      config: dict) -> ForwardIntermediates:
    """Run the forward's intra stage ("split3", the forward's default) and state recurrence on flat tensors and
    keep Gamma and A_kk from the intra stage's float32 scratch."""
    TT, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    C, NC = table.chunk_size, table.num_chunks
    dev = q.device
    BK = min(config.get("intra_BK", 64), triton.next_power_of_2(K))
    BV = min(config.get("intra_BK", 64), triton.next_power_of_2(V))
    BKA = min(config.get("intra_a_BK", 16), triton.next_power_of_2(K))
    row = max(BK, BKA, triton.next_power_of_2(K))
    KP = triton.cdiv(K, row) * row
    per_program = C * C + C * BLOCK + C * KP + 2 * C      # the forward's scratch layout (scratch_views)
    scratch = torch.empty(max(NC, 1) * HV * per_program, device=dev, dtype=torch.float32)
    aqk = torch.empty(TT, HV, C, device=dev, dtype=v.dtype)
    w = torch.empty(TT, HV, K, device=dev, dtype=k.dtype)
    u = torch.empty(TT, HV, V, device=dev, dtype=v.dtype)
    qg = torch.empty(TT, HV, K, device=dev, dtype=q.dtype)
    kg = torch.empty(TT, HV, K, device=dev, dtype=k.dtype)
    gl = torch.empty(NC, HV, K, device=dev, dtype=torch.float32)
    if NC:
        use_gate = opts.use_gate_in_kernel
        flags = dict(H=H, HV=HV, K=K, V=V, C=C, L2NORM=opts.use_qk_l2norm_in_kernel, USE_GATE=use_gate,
                     USE_LB=use_gate and opts.lower_bound is not None, HAS_A=use_gate and A_log is not None,
                     HAS_BIAS=use_gate and dt_bias is not None, BETA_SIGMOID=opts.use_beta_sigmoid_in_kernel,
                     BETA_SCALE=2.0 if opts.allow_neg_eigval else 1.0)
        lower_bound = float(opts.lower_bound) if opts.lower_bound is not None else 0.0
        launch_split3(q, k, v, g, beta, A_log if A_log is not None else g, dt_bias if dt_bias is not None else g,
                      aqk, w, u, qg, kg, gl, scratch, table, flags, float(opts.scale), lower_bound, KP, BK, BKA, BV,
                      {**config, "intra_impl": "split3"}, {})
    h, v_new, _ = chunk_state.chunk_state(kg, w, u, gl, initial_state, table, opts.state_v_first, False, config)
    views = scratch[: NC * HV * per_program].view(NC, HV, per_program)
    akk = views[:, :, : C * C].unflatten(2, (C, C))
    gamma = views[:, :, C * C + C * BLOCK: C * C + C * BLOCK + C * KP].unflatten(2, (C, KP))
    return ForwardIntermediates(gamma, akk, aqk, w, qg, kg, gl, h, v_new)
