"""Gather and scatter of recurrent states between a state pool and a per-sequence batch (Triton).

A pool ``[P, HV, K, V]`` (or ``[P, HV, V, K]``) holds one state per slot; ``slots [N]`` names the slot of
each sequence of a call, a negative slot marking padding.  :func:`gather_states` copies ``pool[slots[n]]``
into row n (zeros for padding, whose slot is never read); :func:`scatter_states` copies row n back to slot
``slots[n]`` (padding rows are not written).  Copies are bitwise: the chunk kernels then run on the
gathered batch exactly as on a call with that batch as ``initial_state``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _gather_kernel(pool, out, slots, row_stride, SIZE: tl.constexpr, BLOCK: tl.constexpr):
    i_n, i_b = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots + i_n).to(tl.int64)
    offs = i_b * BLOCK + tl.arange(0, BLOCK)
    m = offs < SIZE
    if slot >= 0:
        x = tl.load(pool + slot * row_stride + offs, mask=m)
        tl.store(out + i_n.to(tl.int64) * SIZE + offs, x, mask=m)
    else:  # padding: the pool is not read
        tl.store(out + i_n.to(tl.int64) * SIZE + offs, tl.zeros([BLOCK], dtype=out.dtype.element_ty), mask=m)


@triton.jit
def _scatter_kernel(src, pool, slots, row_stride, SIZE: tl.constexpr, BLOCK: tl.constexpr):
    i_n, i_b = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots + i_n).to(tl.int64)
    offs = i_b * BLOCK + tl.arange(0, BLOCK)
    m = offs < SIZE
    if slot >= 0:
        x = tl.load(src + i_n.to(tl.int64) * SIZE + offs, mask=m)
        tl.store(pool + slot * row_stride + offs, x, mask=m)


def _row_contiguous(pool: torch.Tensor) -> bool:
    return pool[0].is_contiguous() if pool.shape[0] else True


def gather_states(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``[N, ...]``: ``pool[slots[n]]`` for each n, zeros where ``slots[n] < 0``."""
    if not _row_contiguous(pool):
        pool = pool.contiguous()
    N, size = slots.shape[0], pool[0].numel() if pool.shape[0] else 0
    out = torch.empty((N, *pool.shape[1:]), device=pool.device, dtype=pool.dtype)
    if N and size:
        _gather_kernel[(N, triton.cdiv(size, BLOCK))](pool, out, slots.contiguous(), pool.stride(0), SIZE=size,
                                                      BLOCK=BLOCK)
    elif N:
        out.zero_()
    return out


def scatter_states(states: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor) -> None:
    """``pool[slots[n]] = states[n]`` for each n with ``slots[n] >= 0`` (in place; the pool's rows must be
    contiguous)."""
    if not _row_contiguous(pool):
        raise ValueError("the state pool's slots must be contiguous to be updated in place")
    N, size = slots.shape[0], states[0].numel() if states.shape[0] else 0
    if N and size:
        _scatter_kernel[(N, triton.cdiv(size, BLOCK))](states.to(pool.dtype).contiguous(), pool, slots.contiguous(),
                                                       pool.stride(0), SIZE=size, BLOCK=BLOCK)


def token_sequence(B: int, T: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """Sequence of every token of the flat ``[B * T]`` axis (no device sync)."""
    tokens = torch.arange(B * T, device=device)
    if cu_seqlens is None:
        return tokens // max(T, 1)
    return torch.searchsorted(cu_seqlens.to(tokens.dtype), tokens, right=True) - 1


def zero_skipped(o: torch.Tensor, slots: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """``o [B, T, HV, V]`` with the tokens of padding sequences (negative slot) set to zero."""
    B, T = o.shape[:2]
    skipped = (slots < 0)[token_sequence(B, T, cu_seqlens, o.device)]
    return o.masked_fill(skipped.view(B, T, 1, 1), 0)
