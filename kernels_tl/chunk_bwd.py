"""The TileLang chunkwise backward, host side: the stages of docs/algorithm.md, "The chunkwise backward" in order.

    0. recompute  (chunk_bwd_recompute.py: ``kda_intra``, ``kda_bwd_states``)  w, u, qg, kg, aqk, gc, h, V_new
    1. state      (chunk_bwd_state.py, ``kda_bwd_state``)      reverse recurrence: dh leaving each chunk, dV_new, dh0
    2. solve      (chunk_bwd_solve.py, ``kda_bwd_solve``)      A_kk and its inverse again; dv, dbeta's T term,
                                                              the gradients of A_kk and A_qk
    3. intra      (chunk_bwd_intra.py, ``kda_bwd_intra``)      dq, dk per value head, dg (reverse cumsum, gate)
    4. prologue   (chunk_bwd_prologue.py, ``kda_bwd_prologue``) group sums, the L2 norm's and beta's backward

Same conventions as the forward (chunk_fwd.py): one flat token axis ``[B*T, heads, dim]`` and the shared chunk
table for ragged T and cu_seqlens.  Every reduction runs in a fixed order (no atomics): two calls give
bitwise-equal gradients.
"""
from __future__ import annotations

import torch

from ..chunks import chunk_table
from ..reference import KDAOptions
from .chunk_bwd_intra import kda_bwd_intra
from .chunk_bwd_prologue import kda_bwd_prologue
from .chunk_bwd_recompute import flat_inputs, recompute_forward
from .chunk_bwd_solve import kda_bwd_solve
from .chunk_bwd_state import kda_bwd_state
from .config import backward_config
from .gate import Prologue
from .target import TL_DTYPES, compile_kernel, for_target, target_for


def check_cotangents(q, v, initial_state, do, dht, opts: KDAOptions, num_seqs: int) -> None:
    """``ValueError`` unless ``do`` has v's shape and ``dht`` (if given) the final state's shape."""
    if tuple(do.shape) != tuple(v.shape):
        raise ValueError(f"do must have v's shape {tuple(v.shape)}, got {tuple(do.shape)}")
    HV, K, V = v.shape[2], q.shape[3], v.shape[3]
    want = (num_seqs, HV, V, K) if opts.state_v_first else (num_seqs, HV, K, V)
    if dht is not None and tuple(dht.shape) != want:
        raise ValueError(f"dht must have the final state's shape {want}, got {tuple(dht.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != want:
        raise ValueError(f"initial_state must have shape {want}, got {tuple(initial_state.shape)}")


def chunk_kda_bwd(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts: KDAOptions, do, dht,
                  config: dict | None = None):
    """Chunkwise KDA backward with the TileLang kernels on user-layout tensors (as chunk_fwd.chunk_kda_fwd).

    ``do [B, T, HV, V]`` is the gradient of the output, ``dht`` that of the final state (the user's state
    layout) or None; ``config`` a :class:`config.BackwardConfig` as a dict.  Returns ``(dq, dk, dv, dg, dbeta,
    dh0, dA_log, ddt_bias)`` in the inputs' dtypes, None for an input that is None (``dA_log``/``ddt_bias``
    also without ``use_gate_in_kernel``).
    """
    cfg = backward_config(config)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    C = opts.chunk_size
    device = q.device
    target = target_for(device)
    TT, TP = B * T, B * T + C
    table = chunk_table(B, T, cu_seqlens, C, device)
    check_cotangents(q, v, initial_state, do, dht, opts, table.num_seqs)
    N, NC = table.num_seqs, table.num_chunks
    f32 = dict(dtype=torch.float32, device=device)
    state_shape = (HV, V, K) if opts.state_v_first else (HV, K, V)

    prologue = Prologue.from_call(opts, A_log is not None, dt_bias is not None)
    a_log = A_log.reshape(HV).to(**f32).contiguous() if prologue.has_A_log else torch.zeros(HV, **f32)
    bias = dt_bias.reshape(HV, K).to(**f32).contiguous() if prologue.has_dt_bias else torch.zeros(HV, K, **f32)
    flat = flat_inputs(q, k, v, g, beta, target)
    qf, kf, vf, gf, bf = flat
    dof = for_target(do.reshape(TT, HV, V).to(q.dtype), target).contiguous()
    # the call's dtype on every target (on the CPU the kernels take float32 tensors and round to it where the
    # GPU does: target.TargetOps.to_tile); g and beta as the host passes them
    dtype, g_dtype, beta_dtype = TL_DTYPES[q.dtype], TL_DTYPES[gf.dtype], TL_DTYPES[bf.dtype]
    task = dict(dtype=dtype, g_dtype=g_dtype, beta_dtype=beta_dtype, scale=float(opts.scale), prologue=prologue)
    BK = min(cfg.bwd_intra_BK, K)
    NKB = K // BK

    # every token row of these is written by the kernels (each token lies in exactly one chunk)
    dq_h = torch.empty(TT, HV, K, **f32)
    dk_h = torch.empty(TT, HV, K, **f32)
    dv = torch.empty(TT, HV, V, **f32)
    dg = torch.empty(TT, HV, K, dtype=gf.dtype, device=device)
    dbeta_solve = torch.empty(TT, HV, **f32)
    dbeta_part = torch.empty(NKB, TT, HV, **f32)
    NG = NC if opts.use_gate_in_kernel else 0
    dA_part, ddt_part = torch.empty(NG, HV, K, **f32), torch.empty(NG, HV, K, **f32)
    h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
    dh0 = torch.zeros(N if h0 is not None else 0, *state_shape, **f32)
    if h0 is not None and dht is not None and not NC:  # only empty sequences: the state passes through
        dh0.copy_(dht)

    if NC:
        # 0. the forward's intermediates
        fwd = recompute_forward(flat, dtype, a_log, bias, h0, table, opts, prologue, target, cfg)
        # 1. reverse state recurrence
        state = compile_kernel(kda_bwd_state, target, K, V, C, dtype=dtype, scale=float(opts.scale),
                               has_dht=dht is not None, store_dh0=h0 is not None, state_v_first=opts.state_v_first,
                               block_V=min(cfg.bwd_state_BV, V))
        dht_f = dht.to(torch.float32).contiguous() if dht is not None else torch.empty(0, *state_shape, **f32)
        dhn = qf.new_empty(NC, HV, K, V)
        dvn = torch.empty(TP, HV, V, **f32)       # rows past a chunk's end are never read (masked on load)
        state(fwd.qg, fwd.kg, fwd.w, fwd.aqk, fwd.gc, dof, table.chunk_bos, table.chunk_len, table.seq_first,
              table.seq_chunks, dht_f, dhn, dvn, dh0)
        # 2. through W, U and the inverse
        solve = compile_kernel(kda_bwd_solve, target, K, V, C, **task, block_V=min(cfg.bwd_solve_BV, V),
                               threads=cfg.bwd_solve_threads)
        d_akk = torch.empty(TP, HV, C, **f32)
        d_aqk = torch.empty(TP, HV, C, **f32)
        solve(kf, vf, gf, bf, a_log, bias, table.chunk_bos, table.chunk_len, dof, fwd.v_new, dvn, fwd.h, dv, d_akk,
              d_aqk, dbeta_solve)
        # 3. dq, dk, dg
        intra = compile_kernel(kda_bwd_intra, target, K, V, C, **task, block_K=BK, block_V=min(cfg.bwd_intra_BV, V),
                               threads=cfg.bwd_intra_threads)
        intra(qf, kf, gf, bf, a_log, bias, table.chunk_bos, table.chunk_len, dof, fwd.v_new, dv, fwd.h, dhn, d_akk,
              d_aqk, dq_h, dk_h, dg, dbeta_part, dA_part, ddt_part)
    # 4. group sums and the q/k/beta prologues
    dq, dk, dbeta = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(bf)
    if TT:
        # only the switches the stage reads: one build serves every gate setting
        switches = Prologue(l2norm=prologue.l2norm, beta_sigmoid=prologue.beta_sigmoid, beta_scale=prologue.beta_scale)
        pro = compile_kernel(kda_bwd_prologue, target, K, dtype=dtype, beta_dtype=beta_dtype, num_k_blocks=NKB,
                             prologue=switches, block_T=cfg.bwd_prologue_BT)
        pro(qf, kf, bf, dq_h, dk_h, dbeta_solve, dbeta_part, dq, dk, dbeta)

    dA_log = ddt_bias = None
    if opts.use_gate_in_kernel:  # per-chunk partials reduced in a fixed order
        if A_log is not None:
            dA_log = dA_part.sum((0, 2)).reshape(A_log.shape).to(A_log.dtype)
        if dt_bias is not None:
            ddt_bias = ddt_part.sum(0).reshape(dt_bias.shape).to(dt_bias.dtype)
    return (dq.view(B, T, H, K).to(q.dtype), dk.view(B, T, H, K).to(k.dtype), dv.view(B, T, HV, V).to(v.dtype),
            dg.view(B, T, HV, K).to(g.dtype), dbeta.view(B, T, HV).to(beta.dtype),
            dh0.to(initial_state.dtype) if initial_state is not None else None, dA_log, ddt_bias)
