"""The chunk table: which chunk of the flat token axis belongs to which sequence (both kernel backends).

Kernels see every input as one flat token axis ``[B*T, heads, dim]``: a batch of B equal sequences is the
varlen pack with offsets ``0, T, 2T, ...``, so ragged lengths and ``cu_seqlens`` share one code path.  The
table lists every chunk of every sequence (the last chunk of a sequence may be short) and, per sequence, its
first chunk and chunk count.  It is built on the host from the sequence lengths and cached, so equal-length
batches build it without touching the device; varlen input reads ``cu_seqlens`` on the host once per call.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkTable:
    """Chunks of all sequences of one call (int32 tensors on the call's device) and their counts."""

    cu: torch.Tensor           # [N + 1] sequence offsets in the flat token axis
    chunk_seq: torch.Tensor    # [NC] sequence of chunk c
    chunk_pos: torch.Tensor    # [NC] index of chunk c inside its sequence
    chunk_bos: torch.Tensor    # [NC] first token of chunk c in the flat token axis
    chunk_len: torch.Tensor    # [NC] tokens in chunk c (C, or fewer for a sequence's last chunk)
    seq_first: torch.Tensor    # [N] global index of each sequence's first chunk
    seq_chunks: torch.Tensor   # [N] number of chunks of each sequence
    num_chunks: int
    num_seqs: int
    chunk_size: int


def sequence_lengths(B: int, T: int, cu_seqlens: torch.Tensor | None) -> tuple[int, ...]:
    """Lengths of the sequences of a call: B times T, or the differences of ``cu_seqlens`` (read on the host)."""
    if cu_seqlens is None:
        return (T,) * B
    offsets = cu_seqlens.tolist()
    return tuple(e - s for s, e in zip(offsets[:-1], offsets[1:]))


def chunk_table(B: int, T: int, cu_seqlens: torch.Tensor | None, chunk_size: int, device) -> ChunkTable:
    """The :class:`ChunkTable` of a call, cached per (sequence lengths, chunk size, device)."""
    return _build(sequence_lengths(B, T, cu_seqlens), chunk_size, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _build(lengths: tuple, chunk_size: int, device: str) -> ChunkTable:
    counts = [-(-n // chunk_size) for n in lengths]
    cu, first = [0], []
    seq, pos, bos, size = [], [], [], []
    for n, (length, count) in enumerate(zip(lengths, counts)):
        first.append(len(seq))
        for j in range(count):
            seq.append(n)
            pos.append(j)
            bos.append(cu[-1] + j * chunk_size)
            size.append(min(chunk_size, length - j * chunk_size))
        cu.append(cu[-1] + length)

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.int32).to(device)

    return ChunkTable(as_tensor(cu), as_tensor(seq), as_tensor(pos), as_tensor(bos), as_tensor(size),
                      as_tensor(first), as_tensor(counts), len(seq), len(lengths), chunk_size)
