"""Host side of the Triton chunkwise forward: the chunk table and the stage launches.

Every input is viewed as a flat token axis ``[TT = B*T, heads, dim]``; a batch of B equal sequences is the
varlen pack with offsets ``0, T, 2T, ...``.  The chunk table lists every chunk of every sequence
(``chunk_seq[c]`` its sequence, ``chunk_pos[c]`` its index inside it), so ragged T and cu_seqlens share one
code path.  Stages (one file each, same stems as ``kernels_tl``):

    gate.py         prologues (q/k L2 norm, gate + chunk-local cumsum Gamma, beta activation), fused into:
    chunk_intra.py  A_kk, A_qk, the blocked inverse (solve_tril.py), W, U, q*exp(Gamma), k*exp(Gamma_C - Gamma)
                    (its organisations: chunk_intra_split3.py, the default, and chunk_intra_fused.py,
                    chunk_intra_split.py, chunk_intra_split2.py)
    chunk_state.py  inter-chunk state recurrence: state entering each chunk, V_new, final state
    chunk_o.py      O = scale (q * exp(Gamma)) S + A_qk V_new

Memory besides the outputs: A_qk, W, U, V_new, q*exp(Gamma), k*exp(Gamma_C - Gamma) (token-sized, input
dtype), the chunk states h (chunks x HV x K x V, input dtype) and the intra stage's float32 scratch
(~54 KB per chunk and head at C = 64, K = 128).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import chunk_intra, chunk_o, chunk_state


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
    """The :class:`ChunkTable` of a call, cached per (sequence lengths, chunk size, device): equal-length
    batches build it without touching the device; varlen input reads ``cu_seqlens`` on the host once."""
    if cu_seqlens is None:
        lengths = (T,) * B
    else:
        offsets = cu_seqlens.tolist()
        lengths = tuple(e - s for s, e in zip(offsets[:-1], offsets[1:]))
    return _build_table(lengths, chunk_size, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _build_table(lengths: tuple, chunk_size: int, device: str) -> ChunkTable:
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


def float32_precisions() -> dict:
    """Precision of the float32 products for float32 inputs, following PyTorch's own switch
    (``torch.set_float32_matmul_precision``): "highest" (PyTorch's default) gives float32-accurate products
    (3xTF32 on the tensor cores, the inverse in float32 FMA, its diagonal blocks by forward substitution),
    "high"/"medium" allow TF32 (~1e-3 error)."""
    if torch.get_float32_matmul_precision() == "highest":
        return {"intra_precision": "tf32x3", "solve_precision": "ieee", "solve_diag": "subst",
                "dot_precision": "tf32x3"}
    return {"intra_precision": "tf32", "solve_precision": "tf32", "solve_diag": "tf32", "dot_precision": "tf32"}


def default_config(dtype: torch.dtype | None = None) -> dict:
    """Shipped defaults of every stage (measured on an H100, docs/triton.md); the state recurrence's V block
    is left to the call (``state_BV`` None: :func:`chunk_state.state_block_v`).  bf16/fp16 inputs keep TF32
    for the float32 intermediates (A, inverse); float32 inputs follow :func:`float32_precisions`."""
    cfg = {**chunk_intra.DEFAULT_CONFIG, **chunk_state.DEFAULT_CONFIG, **chunk_o.DEFAULT_CONFIG,
           "dot_precision": "tf32"}
    if dtype == torch.float32:
        cfg.update(float32_precisions())
    return cfg


def get_configs(dtype: torch.dtype | None = None) -> list[dict]:
    """The search space: the default, then each stage's alternatives with the other stages at default
    (the stages are separate kernels, so they can be tuned one at a time), taken from the stages in turn so
    that a budget-limited search (``autotune --max-configs``) still tries every stage."""
    base = default_config(dtype)
    out = [base]
    per_stage = [stage.get_configs() for stage in (chunk_intra, chunk_state, chunk_o)]
    for i in range(max(map(len, per_stage))):
        for configs in per_stage:
            candidate = {**base, **configs[i]} if i < len(configs) else base
            if candidate not in out:
                out.append(candidate)
    return out


def chunk_kda_fwd(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts, output_final_state: bool,
                  config: dict | None = None, return_states: bool = False):
    """Chunkwise KDA forward with Triton kernels on user-layout tensors.

    Returns ``(o [B, T, HV, V], final_state or None)``, plus ``h`` (state entering each chunk, in k's dtype
    and the ``state_v_first`` layout: ``[B, NT, HV, K, V]``, varlen ``[1, total chunks, HV, K, V]``) with
    ``return_states`` (what ``chunk_kda(return_intermediate_states=True)`` returns).
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    config = {**default_config(q.dtype), **(config or {})}
    table = chunk_table(B, T, cu_seqlens, opts.chunk_size, q.device)
    q, k, v = (x.reshape(B * T, x.shape[2], x.shape[3]).contiguous() for x in (q, k, v))
    g = g.reshape(B * T, HV, K).contiguous()
    beta = beta.reshape(B * T, HV).contiguous()
    A_log, dt_bias = (x.contiguous() if x is not None else None for x in (A_log, dt_bias))
    aqk, w, u, qg, kg, gl = chunk_intra.chunk_intra(q, k, v, g, beta, A_log, dt_bias, opts, table, config)
    h, v_new, final = chunk_state.chunk_state(kg, w, u, gl, initial_state, table, opts.state_v_first,
                                              output_final_state, config)
    o = chunk_o.chunk_o(qg, h, aqk, v_new, opts.scale, table, config)
    o = o.view(B, T, HV, V)
    if return_states:  # as kda_reference_chunk_states: [B, NT, ...], or [1, total chunks, ...] for varlen
        hs = h.transpose(-1, -2) if opts.state_v_first else h
        hs = hs.unsqueeze(0) if cu_seqlens is not None else hs.view(B, -1, *hs.shape[1:])
        return o, final, hs.contiguous()
    return o, final
