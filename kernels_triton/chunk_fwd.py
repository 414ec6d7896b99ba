"""Host side of the Triton chunkwise forward: the chunk table and the stage launches.

Every input is viewed as a flat token axis ``[TT = B*T, heads, dim]``; a batch of B equal sequences is the
varlen pack with offsets ``0, T, 2T, ...``.  The chunk table lists every chunk of every sequence
(``chunk_seq[c]`` its sequence, ``chunk_pos[c]`` its index inside it), so ragged T and cu_seqlens share one
code path.  Stages (one file each, same stems as ``kernels_tl``):

    gate.py         prologue: q/k L2 norm, gate + chunk-local cumsum (Gamma), beta activation
    chunk_intra.py  A_kk, A_qk, the blocked inverse (I + A_kk)^-1, W, U and k*exp(Gamma_C - Gamma)
    chunk_state.py  inter-chunk state recurrence: state entering each chunk, V_new, final state
    chunk_o.py      O = scale (q * exp(Gamma)) S + A_qk V_new
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import chunk_intra, chunk_o, chunk_state, gate


@dataclass
class ChunkTable:
    """Chunks of all sequences of one call (int32 device tensors) and their sizes."""

    cu: torch.Tensor          # [N + 1] sequence offsets in the flat token axis
    chunk_seq: torch.Tensor   # [NC] sequence of chunk c
    chunk_pos: torch.Tensor   # [NC] index of chunk c inside its sequence
    chunk_first: torch.Tensor  # [N] global index of each sequence's first chunk
    num_chunks: int
    num_seqs: int
    chunk_size: int


def chunk_table(B: int, T: int, cu_seqlens: torch.Tensor | None, chunk_size: int, device) -> ChunkTable:
    """Build the :class:`ChunkTable` (one host read of ``cu_seqlens`` for varlen input)."""
    if cu_seqlens is None:
        lengths = [T] * B
    else:
        offsets = cu_seqlens.tolist()
        lengths = [e - s for s, e in zip(offsets[:-1], offsets[1:])]
    counts = [-(-n // chunk_size) for n in lengths]
    seq = [n for n, c in enumerate(counts) for _ in range(c)]
    pos = [j for c in counts for j in range(c)]
    first, acc = [], 0
    for c in counts:
        first.append(acc)
        acc += c
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    return ChunkTable(as_tensor(cu), as_tensor(seq), as_tensor(pos), as_tensor(first), len(seq), len(lengths),
                      chunk_size)


def default_config() -> dict:
    """Shipped defaults of every stage (chosen on an H100; see docs/triton.md)."""
    return {**gate.DEFAULT_CONFIG, **chunk_intra.DEFAULT_CONFIG, **chunk_state.DEFAULT_CONFIG,
            **chunk_o.DEFAULT_CONFIG}


def get_configs() -> list[dict]:
    """The search space: the default, then each stage's alternatives with the other stages at default
    (the stages are separate kernels, so they can be tuned one at a time)."""
    base = default_config()
    out = [base]
    for stage in (gate, chunk_intra, chunk_state, chunk_o):
        for cfg in stage.get_configs():
            candidate = {**base, **cfg}
            if candidate not in out:
                out.append(candidate)
    return out


def chunk_kda_fwd(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts, output_final_state: bool,
                  config: dict | None = None, return_states: bool = False):
    """Chunkwise KDA forward with Triton kernels on user-layout tensors.

    Returns ``(o [B, T, HV, V], final_state or None)``, plus ``h`` (state entering each chunk,
    ``[1, total chunks, HV, K, V]`` in k's dtype, layout per ``state_v_first``) with ``return_states``.
    """
    config = {**default_config(), **(config or {})}
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    table = chunk_table(B, T, cu_seqlens, opts.chunk_size, q.device)
    q, k, v = (x.reshape(B * T, x.shape[2], x.shape[3]).contiguous() for x in (q, k, v))
    g = g.reshape(B * T, HV, K).contiguous()
    beta = beta.reshape(B * T, HV).contiguous()
    if opts.use_qk_l2norm_in_kernel:
        q, k = gate.l2norm(q), gate.l2norm(k)
    gc, beta = gate.chunk_gate_cumsum(g, beta, A_log, dt_bias, opts, table, config)
    aqk, w, u, kg = chunk_intra.chunk_intra(q, k, v, gc, beta, opts.scale, table, config)
    h, v_new, final = chunk_state.chunk_state(kg, w, u, gc, initial_state, table, opts.state_v_first,
                                              output_final_state, config)
    o = chunk_o.chunk_o(q, gc, h, aqk, v_new, opts.scale, table, config)
    o = o.view(B, T, HV, V)
    if return_states:
        hs = h.transpose(-1, -2) if opts.state_v_first else h
        return o, final, hs.unsqueeze(0).contiguous()
    return o, final
