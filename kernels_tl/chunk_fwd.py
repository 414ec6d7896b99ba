"""The TileLang chunkwise forward, host side: the stages of docs/algorithm.md in order.

    1. intra           (chunk_intra.py, ``kda_intra``)          Gamma, A_kk, aqk, the inverse, w, u, qg, kg, gc
    2. state + 3. output (chunk_state.py, ``kda_state_output``)  the state recurrence fused with the output

Every input is seen as one flat token axis (``[B*T, heads, dim]``); the chunk table (:mod:`kda_compile.chunks`)
lists every chunk of every sequence.  Stage 1 runs over all (chunk, head) pairs at once; stages 2 and 3 walk
each (sequence, head, value block) through its chunks.
"""
from __future__ import annotations

import torch

from ..chunks import chunk_table
from ..reference import KDAOptions
from .chunk_intra import kda_intra
from .chunk_state import kda_state_output
from .config import chunk_config
from .gate import Prologue
from .target import TL_DTYPES, compile_kernel, for_target, target_for

# Hopper warp specialisation and TMA stay on for the state/output kernel: without warp specialisation TileLang
# 0.1.15's pipeline planner rejects the in-place masking of the kg tile.
STATE_THREADS = 128


def chunk_kda_fwd(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts: KDAOptions,
                  output_final_state: bool, config: dict | None = None):
    """Chunkwise KDA forward with the TileLang kernels; returns ``(o, final_state or None)``.  Tensors in the
    user's layout (see :func:`kda_compile.chunk_kda`); ``config`` a :class:`config.ChunkConfig` as a dict."""
    stage1, stage2, finish = plan(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts,
                                  output_final_state, config)
    stage1()
    stage2()
    return finish()


def plan(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts: KDAOptions,
         output_final_state: bool, config: dict | None = None):
    """Compile (cached) and allocate everything; returns ``(stage1, stage2, finish)``: the two launches as
    closures (so benchmarks can time each) and the function returning ``(o, final_state)``."""
    cfg = chunk_config(config)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    C = opts.chunk_size
    device = q.device
    target = target_for(device)
    TT = B * T
    table = chunk_table(B, T, cu_seqlens, C, device)

    prologue = Prologue.from_call(opts, A_log is not None, dt_bias is not None)
    f32 = dict(dtype=torch.float32, device=device)
    a_log = A_log.reshape(HV).to(**f32).contiguous() if prologue.has_A_log else torch.zeros(HV, **f32)
    bias = dt_bias.reshape(HV, K).to(**f32).contiguous() if prologue.has_dt_bias else torch.zeros(HV, K, **f32)
    qf, kf = (for_target(x.reshape(TT, H, K), target).contiguous() for x in (q, k))
    vf = for_target(v.reshape(TT, HV, V), target).contiguous()
    gf = for_target(g.reshape(TT, HV, K), target).contiguous()
    bf = for_target(beta.reshape(TT, HV), target).contiguous()
    dtype = TL_DTYPES[qf.dtype]
    if gf.dtype not in TL_DTYPES:
        gf = gf.float()
    if bf.dtype not in TL_DTYPES:
        bf = bf.float()

    intra = compile_kernel(kda_intra, target, K, V, C, dtype=dtype, g_dtype=TL_DTYPES[gf.dtype],
                           beta_dtype=TL_DTYPES[bf.dtype], scale=float(opts.scale), prologue=prologue,
                           threads=cfg.intra_threads, diag_gemm=cfg.diag_gemm)
    TP = TT + C  # padded rows: stage 2 reads whole chunks
    w = qf.new_empty(TP, HV, K)
    u = qf.new_empty(TP, HV, V)
    qg = qf.new_empty(TP, HV, K)
    kg = qf.new_empty(TP, HV, K)
    aqk = qf.new_empty(TP, HV, C)
    gc = torch.empty(table.num_chunks, HV, K, **f32)

    has_h0 = initial_state is not None
    state_shape = (HV, V, K) if opts.state_v_first else (HV, K, V)
    h0 = initial_state.to(torch.float32).contiguous() if has_h0 else torch.empty(0, *state_shape, **f32)
    ht = (torch.empty(table.num_seqs, *state_shape, **f32) if output_final_state
          else torch.empty(0, *state_shape, **f32))
    state = compile_kernel(kda_state_output, target, K, V, C, dtype=dtype, out_dtype=dtype, scale=float(opts.scale),
                           has_h0=has_h0, store_final=output_final_state, state_v_first=opts.state_v_first,
                           block_V=min(cfg.state_BV, V), num_stages=cfg.state_stages, threads=STATE_THREADS)
    o = torch.empty(TT, HV, V, dtype=vf.dtype, device=device)

    def stage1():
        intra(qf, kf, vf, gf, bf, a_log, bias, table.chunk_bos, table.chunk_len, w, u, qg, kg, aqk, gc)

    def stage2():
        state(w, u, qg, kg, aqk, gc, table.chunk_bos, table.chunk_len, table.seq_first, table.seq_chunks, h0, o, ht)

    def finish():
        return o.view(B, T, HV, V).to(v.dtype), (ht if output_final_state else None)

    return stage1, stage2, finish
