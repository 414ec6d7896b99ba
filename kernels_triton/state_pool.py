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
def _slot_copy_kernel(src, dst, slots, pool_stride, SIZE: tl.constexpr, BLOCK: tl.constexpr, GATHER: tl.constexpr):
    """Block ``program_id(1)`` of row n: ``GATHER``: ``dst[n] = src[slots[n]]`` (src the pool; zeros, the pool not
    read, for padding); else ``dst[slots[n]] = src[n]`` (dst the pool; padding not written)."""
    i_n, i_b = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots + i_n).to(tl.int64)
    offs = i_b * BLOCK + tl.arange(0, BLOCK)
    m = offs < SIZE
    row = i_n.to(tl.int64) * SIZE
    if GATHER:
        # padding as a vector mask over the block (a scalar mask breaks Triton's CPU interpreter)
        x = tl.load(src + slot * pool_stride + offs, mask=m & ((offs * 0 + slot) >= 0), other=0.0)
        tl.store(dst + row + offs, x, mask=m)
    elif slot >= 0:
        tl.store(dst + slot * pool_stride + offs, tl.load(src + row + offs, mask=m), mask=m)


def _row_contiguous(pool: torch.Tensor) -> bool:
    return pool[0].is_contiguous() if pool.shape[0] else True


def gather_states(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``[N, ...]``: ``pool[slots[n]]`` for each n, zeros where ``slots[n] < 0``."""
    if not _row_contiguous(pool):
        pool = pool.contiguous()
    N, size = slots.shape[0], pool[0].numel() if pool.shape[0] else 0
    out = torch.empty((N, *pool.shape[1:]), device=pool.device, dtype=pool.dtype)
    if N and size:
        _slot_copy_kernel[(N, triton.cdiv(size, BLOCK))](pool, out, slots.contiguous(), pool.stride(0), SIZE=size,
                                                         BLOCK=BLOCK, GATHER=True)
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
        _slot_copy_kernel[(N, triton.cdiv(size, BLOCK))](states.to(pool.dtype).contiguous(), pool, slots.contiguous(),
                                                         pool.stride(0), SIZE=size, BLOCK=BLOCK, GATHER=False)


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
