"""The TileLang chunkwise forward, host side: one fused kernel per segment, and the segment scan when a sequence is
long enough to be split (docs/algorithm.md, docs/tilelang.md "Fused forward").

    1. pass 1   (chunk_fused.py, ``kda_fused``)           every stage of every chunk, state on chip
    2. scan     (segment_scan.py, ``kda_segment_scan``)   only when some sequence has several segments
    3. fix-up   (segment_scan.py, ``kda_segment_fixup``)  idem

Every input is seen as one flat token axis (``[B*T, heads, dim]``); the chunk table (:mod:`kda_compile.chunks`)
lists every chunk of every sequence and the segment table (:mod:`.segments`) cuts sequences into segments.
Without a split the fused kernel writes the outputs and each sequence's final state directly.
"""
from __future__ import annotations

import torch

from ..chunks import chunk_table, sequence_lengths
from ..reference import KDAOptions
from . import segments
from .chunk_fused import SMEM_LIMIT, kda_fused, shared_bytes
from .config import chunk_config, segment_length
from .segment_scan import kda_segment_fixup, kda_segment_scan
from .target import TL_DTYPES, compile_kernel, flat_inputs, target_for

SCAN_THREADS = 128


def chunk_kda_fwd(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts: KDAOptions,
                  output_final_state: bool, config: dict | None = None, return_states: bool = False):
    """Chunkwise KDA forward with the TileLang kernels; returns ``(o, final_state or None)``, and the state entering
    each chunk as a third element with ``return_states`` (then unsplit).  Tensors in the user's layout (see
    :func:`kda_compile.chunk_kda`); ``config`` a :class:`config.ChunkConfig` as a dict."""
    launches, finish = plan(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts, output_final_state,
                            config, return_states)
    for launch in launches.values():
        launch()
    return finish()


def plan(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts: KDAOptions, output_final_state: bool,
         config: dict | None = None, return_states: bool = False):
    """Compile (cached) and allocate; returns ``(launches, finish)``: the launches by name ("pass1", and "scan",
    "fixup" when split) as closures, so benchmarks can time each, and the function returning the results."""
    cfg = chunk_config(config)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    device = q.device
    target = target_for(device)
    TT = B * T
    # the kernels are built for the call's dtype on every target (on the CPU its tensors are float32 and the
    # kernels round to it where the GPU does: target.TargetOps.to_tile)
    dtype = TL_DTYPES.get(q.dtype, "float32")
    C, BV = kernel_tiles(K, V, opts.chunk_size, cfg.state_BV, dtype, target)
    table = chunk_table(B, T, cu_seqlens, C, device)
    seg_len = 0 if return_states else segment_length(cfg, device)
    segs = segments.segment_table(sequence_lengths(B, T, cu_seqlens), C, seg_len, device)
    split = segs.split

    x = flat_inputs(q, k, v, g, beta, A_log, dt_bias, opts, target)
    qf, kf, gf, bf, a_log, bias, prologue = x.q, x.k, x.g, x.beta, x.a_log, x.dt_bias, x.prologue
    vf = x.v.to(q.dtype).to(qf.dtype)   # v in q's dtype (values rounded to it on the CPU too)
    f32 = dict(dtype=torch.float32, device=device)

    has_h0 = initial_state is not None
    state_shape = (HV, V, K) if opts.state_v_first else (HV, K, V)
    h0 = initial_state.to(torch.float32).contiguous() if has_h0 else torch.empty(0, *state_shape, **f32)
    fused = compile_kernel(kda_fused, target, K, V, C, dtype=dtype, g_dtype=TL_DTYPES[gf.dtype],
                           beta_dtype=TL_DTYPES[bf.dtype], scale=float(opts.scale), prologue=prologue, has_h0=has_h0,
                           state_v_first=opts.state_v_first, store_states=return_states, block_V=BV,
                           threads=cfg.threads)
    hc = qf.new_empty(table.num_chunks, HV, K, V) if return_states else None
    out = {}

    def pass1():
        out["o"], out["qt"], out["hs"] = segments.pass1(fused, qf, kf, vf, gf, bf, a_log, bias, table, segs, h0,
                                                        split, hc)

    launches = {"pass1": pass1}
    if split:
        scan_kernel = compile_kernel(kda_segment_scan, target, K, V, state_v_first=opts.state_v_first, block_V=BV,
                                     threads=SCAN_THREADS)
        fix_kernel = compile_kernel(kda_segment_fixup, target, K, V, C, dtype=dtype, block_V=BV,
                                    threads=SCAN_THREADS)

        def scan():
            out["s_in"], out["final"] = segments.scan(scan_kernel, out["hs"], segs, state_shape)

        def fixup():
            segments.fixup(fix_kernel, out["qt"], out["s_in"], table, segs, out["o"])

        launches.update(scan=scan, fixup=fixup)

    def finish():
        o = out["o"].view(B, T, HV, V).to(v.dtype)
        final = None
        if output_final_state or return_states:
            final = out["final"] if split else _user_layout(out["hs"], opts.state_v_first)
        if not return_states:
            return o, (final if output_final_state else None)
        h = _user_layout(hc, opts.state_v_first).to(k.dtype)
        if C != opts.chunk_size:   # the kernel ran at a smaller chunk: keep the states entering the user's chunks
            user = chunk_table(B, T, cu_seqlens, opts.chunk_size, device)
            h = h[torch.searchsorted(table.chunk_bos, user.chunk_bos).long()]
        h = h.view(B, -1, *h.shape[1:]) if cu_seqlens is None else h.unsqueeze(0)
        return o, final, h

    return launches, finish


def kernel_tiles(K: int, V: int, chunk_size: int, state_BV: int, dtype: str, target: str) -> tuple[int, int]:
    """``(C, block_V)`` of the fused kernel: the config's column block capped at K and V, halved (not below 16) until
    the program's shared memory fits the GPU, and the chunk halved to 32 when even that does not fit (float32 at
    K = 128: same math, the rounding of a smaller chunk).  Depends on the head dims, dtype and config only."""
    C, BV = chunk_size, min(state_BV, K, V)
    if target == "c":
        return C, BV
    while BV > 16 and shared_bytes(K, V, C, BV, dtype) > SMEM_LIMIT:
        BV //= 2
    if shared_bytes(K, V, C, BV, dtype) > SMEM_LIMIT and C > 32:
        return kernel_tiles(K, V, 32, state_BV, dtype, target)
    return C, BV


def _user_layout(states: torch.Tensor, state_v_first: bool) -> torch.Tensor:
    """K-first states ``[rows, HV, K, V]`` in the user's layout (transposed with ``state_v_first``)."""
    return states.transpose(-1, -2).contiguous() if state_v_first else states
