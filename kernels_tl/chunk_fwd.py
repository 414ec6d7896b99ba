"""Host side of the chunkwise forward: chunk tables for ragged/varlen input and the two kernel launches.

Every input is seen as one flat token axis (``[B*T, heads, dim]``; a fixed-length batch is B sequences of
T tokens).  The chunk table lists, for every chunk of every sequence, its first token and length (the last
chunk of a sequence may be short); the sequence table gives each sequence's first chunk and chunk count.
Stage 1 (:mod:`.chunk_intra`) runs over all (chunk, head) pairs at once; stage 2 (:mod:`.chunk_state`) walks
each (sequence, head, value block) through its chunks.
"""
from __future__ import annotations

import torch

from ..reference import KDAOptions
from .chunk_intra import chunk_intra
from .chunk_state import chunk_state
from .gate import Prologue
from .target import TL_DTYPES, compile_kernel, for_target, gpu_pass_configs, target_for

# Defaults measured on H100 at B2·T8192·H16 (bench/results_tilelang.md): 256 threads for stage 1, 32 state
# columns per program for stage 2 (more programs in flight for few heads x sequences).
DEFAULT_CONFIG = {"block": 16, "intra_threads": 256, "diag_gemm": True, "block_V": 32, "num_stages": 1,
                  "state_threads": 128, "state_ws": True, "state_tma": True}

_TABLES: dict = {}


def chunk_tables(B: int, T: int, cu_seqlens: torch.Tensor | None, C: int, device: torch.device):
    """``(chunk_bos, chunk_len, seq_chunk0, seq_nchunks)`` int32 tensors on ``device`` (cached for fixed
    lengths; varlen offsets are read on the host)."""
    key = (B, T, C, str(device)) if cu_seqlens is None else None
    if key is not None and key in _TABLES:
        return _TABLES[key]
    if cu_seqlens is None:
        bounds = [(b * T, T) for b in range(B)]
    else:
        offsets = cu_seqlens.tolist()
        bounds = [(s, e - s) for s, e in zip(offsets[:-1], offsets[1:])]
    bos, lens, first, count = [], [], [], []
    for start, size in bounds:
        n = -(-size // C)
        first.append(len(bos))
        count.append(n)
        for i in range(n):
            bos.append(start + i * C)
            lens.append(min(C, size - i * C))
    tables = tuple(torch.tensor(x, dtype=torch.int32).to(device) for x in (bos, lens, first, count))
    if key is not None:
        _TABLES[key] = tables
    return tables


def chunk_kda_fwd(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts: KDAOptions,
                  output_final_state: bool, config: dict | None = None):
    """Chunkwise KDA forward with the TileLang kernels; returns ``(o, final_state or None)``.  Tensors in
    the user's layout (see :func:`kda_compile.chunk_kda`)."""
    stage1, stage2, finish = plan(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts,
                                  output_final_state, config)
    stage1()
    stage2()
    return finish()


def plan(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts: KDAOptions,
         output_final_state: bool, config: dict | None = None):
    """Compile (cached) and allocate everything; returns ``(stage1, stage2, finish)``: the two launches as
    closures (so benchmarks can time each stage) and the function returning ``(o, final_state)``."""
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    C = opts.chunk_size
    device = q.device
    target = target_for(device)
    TT = B * T
    chunk_bos, chunk_len, seq_chunk0, seq_nchunks = chunk_tables(B, T, cu_seqlens, C, device)
    NC, NS = chunk_bos.numel(), seq_chunk0.numel()

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

    intra = compile_kernel(chunk_intra, target, K, V, C, dtype=dtype, g_dtype=TL_DTYPES[gf.dtype],
                           beta_dtype=TL_DTYPES[bf.dtype], scale=float(opts.scale), prologue=prologue,
                           block=cfg["block"], threads=cfg["intra_threads"], diag_gemm=cfg["diag_gemm"])
    TP = TT + C  # padded rows: stage 2 reads whole chunks
    w = qf.new_empty(TP, HV, K)
    u = qf.new_empty(TP, HV, V)
    qg = qf.new_empty(TP, HV, K)
    kd = qf.new_empty(TP, HV, K)
    aqk = qf.new_empty(TP, HV, C)
    gl = torch.empty(NC, HV, K, **f32)

    has_h0 = initial_state is not None
    state_shape = (HV, V, K) if opts.state_v_first else (HV, K, V)
    h0 = initial_state.to(torch.float32).contiguous() if has_h0 else torch.empty(0, *state_shape, **f32)
    ht = torch.empty(NS, *state_shape, **f32) if output_final_state else torch.empty(0, *state_shape, **f32)
    block_V = min(cfg["block_V"], V)
    state = compile_kernel(chunk_state, target, K, V, C, dtype=dtype, out_dtype=dtype,
                           has_h0=has_h0, store_final=output_final_state, state_v_first=opts.state_v_first,
                           block_V=block_V, num_stages=cfg["num_stages"], threads=cfg["state_threads"],
                           pass_configs=gpu_pass_configs(cfg["state_ws"], cfg["state_tma"]))
    o = torch.empty(TT, HV, V, dtype=vf.dtype, device=device)

    def stage1():
        intra(qf, kf, vf, gf, bf, a_log, bias, chunk_bos, chunk_len, w, u, qg, kd, aqk, gl)

    def stage2():
        state(w, u, qg, kd, aqk, gl, chunk_bos, chunk_len, seq_chunk0, seq_nchunks, h0, o, ht)

    def finish():
        return o.view(B, T, HV, V).to(v.dtype), (ht if output_final_state else None)

    return stage1, stage2, finish
