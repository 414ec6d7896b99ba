"""The Triton chunkwise forward, host side: the three stages of docs/algorithm.md in order.

    1. intra   (chunk_intra.py)  Gamma, A_kk, aqk, T = (I + A_kk)^-1 diag(beta), w, u, qg, kg, gc
    2. state   (chunk_state.py)  h (state entering each chunk), v_new = u - w h, the final state
    3. output  (chunk_o.py)      o = scale qg h + aqk v_new

Every input is viewed as a flat token axis ``[TT = B*T, heads, dim]``; the chunk table
(:mod:`kda_compile.chunks`) maps chunks to sequences, so ragged T and ``cu_seqlens`` share one code path.
Memory besides the outputs: aqk, w, u, v_new, qg, kg (token-sized, input dtype), h (chunks x HV x K x V,
input dtype) and the intra stage's float32 scratch (~54 KB per chunk and head at C = 64, K = 128).  One kernel
for the whole forward measured 8-30x slower on the H200 (docs/triton.md, "A fused forward").
"""
from __future__ import annotations

from kda_compile.chunks import chunk_table

from . import chunk_intra, chunk_o, chunk_state
from .chunk_intra import Kept
from .chunk_intra import chunk_intra as run_intra
from .chunk_o import chunk_o as run_output
from .chunk_state import chunk_state as run_state
from .config import chunk_config
from .state_pool import gather_states, scatter_states, zero_skipped


def chunk_kda_fwd(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts, output_final_state: bool,
                  config: dict | None = None, return_states: bool = False, keep: bool = False):
    """Chunkwise KDA forward with the Triton kernels on user-layout tensors (see ``kda_compile.chunk_kda``).

    Returns ``(o [B, T, HV, V], final_state or None)``, plus ``h`` (state entering each chunk, in k's dtype and
    the ``state_v_first`` layout: ``[B, NT, HV, K, V]``, varlen ``[1, total chunks, HV, K, V]``) with
    ``return_states``, or plus the :class:`chunk_intra.Kept` X and aqk for the backward with ``keep`` (a training
    forward: ``chunk_bwd.chunk_kda_bwd`` then does not form them again).  ``config``: a :class:`config.ChunkConfig`
    as a dict (missing keys at their defaults).
    """
    cfg = chunk_config(config, q.dtype)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    table = chunk_table(B, T, cu_seqlens, opts.chunk_size, q.device)
    q, k, v = (x.reshape(B * T, x.shape[2], x.shape[3]).contiguous() for x in (q, k, v))
    g = g.reshape(B * T, HV, K).contiguous()
    beta = beta.reshape(B * T, HV).contiguous()
    A_log, dt_bias = (x.contiguous() if x is not None else None for x in (A_log, dt_bias))

    intra = run_intra(q, k, v, g, beta, A_log, dt_bias, opts, table, cfg, keep_x=keep)
    h, v_new, final = run_state(intra.kg, intra.w, intra.u, intra.gc, initial_state, table, opts.state_v_first,
                                output_final_state, cfg)
    o = run_output(intra.qg, h, intra.aqk, v_new, opts.scale, table, cfg).view(B, T, HV, V)

    if return_states:  # as kda_reference_chunk_states: [B, NT, ...], or [1, total chunks, ...] for varlen
        hs = h.transpose(-1, -2) if opts.state_v_first else h
        hs = hs.unsqueeze(0) if cu_seqlens is not None else hs.view(B, -1, *hs.shape[1:])
        return o, final, hs.contiguous()
    if keep:
        return o, final, Kept(intra.x, intra.aqk)
    return o, final


def chunk_kda_fwd_pooled(q, k, v, g, beta, pool, slots, cu_seqlens, A_log, dt_bias, opts,
                         inplace_final_state: bool, config: dict | None = None):
    """:func:`chunk_kda_fwd` with the initial states in pool slots (``slots [N]``, negative: padding, skipped
    with zero output and state); in place, the final states are written back to the slots.  The states are
    gathered into a batch before the kernels and scattered back after them, so each sequence computes
    exactly what a call on it alone computes.  Returns ``(o, final_state)``."""
    h0 = gather_states(pool, slots)
    o, final = chunk_kda_fwd(q, k, v, g, beta, h0, cu_seqlens, A_log, dt_bias, opts, True, config)
    skipped = (slots < 0).view(-1, 1, 1, 1)
    final = final.masked_fill(skipped, 0)
    if inplace_final_state:
        scatter_states(final, pool, slots)
    return zero_skipped(o, slots, cu_seqlens), final


def get_configs() -> list[dict]:
    """The search space: the default (``{}``), then each stage's alternatives with the other stages at their
    defaults (the stages are separate kernels, so they can be tuned one at a time), taken from the stages in
    turn so that a budget-limited search still tries every stage."""
    out = [{}]
    per_stage = [stage.get_configs() for stage in (chunk_intra, chunk_state, chunk_o)]
    for i in range(max(map(len, per_stage))):
        for configs in per_stage:
            if i < len(configs) and configs[i] not in out:
                out.append(configs[i])
    return out
