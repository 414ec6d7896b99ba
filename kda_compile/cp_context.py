"""Which tokens of a sequence (or of a varlen pack) each rank holds under context parallelism.

A :class:`KDAContext` describes one assignment of the global token axis to the ranks of a
``torch.distributed`` process group: every rank holds one or more contiguous *pieces* ``[start, end)`` of the
global pack, concatenated in the order listed (its local token axis).  Any assignment works, e.g. the equal
contiguous split (:func:`build_cp_context`, as flash-linear-attention's ``build_cp_context``) or PyTorch's
load-balanced causal layout, where rank r holds part r and part 2W-1-r of 2W equal parts (``layout="head_tail"``).

A *segment* is the intersection of a piece with one sequence of the pack: the unit of the segment scan
(docs/context_parallel.md).  Every rank derives the same segment list from the same arguments, so no
metadata is exchanged.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "head_tail")


@dataclass(frozen=True)
class Segment:
    """The tokens ``[start, end)`` (global pack positions) of sequence ``seq`` held by ``rank``; they sit at
    ``local_start`` in that rank's local token axis, and are the ``slot``-th segment of that rank."""

    seq: int
    start: int
    end: int
    rank: int
    slot: int
    local_start: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, eq=False)
class KDAContext:
    """Context-parallel layout of one call (pass it as ``cp_context``).

    ``seq_offsets``: the global pack's sequence offsets ``(0, s1, s1 + s2, ..., total)``;
    ``rank_pieces[r]``: the global ``(start, end)`` pieces rank r holds, in its local order;
    ``conv1d_kernel_size``: width of the short causal convolution before KDA (for the halo exchange).
    ``group`` None means the default process group.
    """

    group: object
    rank: int
    world_size: int
    seq_offsets: tuple
    rank_pieces: tuple
    conv1d_kernel_size: int | None = None

    def __post_init__(self):
        if len(self.rank_pieces) != self.world_size:
            raise ValueError(f"rank_pieces must list the pieces of all {self.world_size} ranks, "
                             f"got {len(self.rank_pieces)}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        total = self.seq_offsets[-1]
        covered = sorted(p for pieces in self.rank_pieces for p in pieces)
        position = 0
        for start, end in covered:
            if start != position or end <= start:
                raise ValueError(f"rank_pieces must cover [0, {total}) exactly with non-empty pieces, "
                                 f"got {self.rank_pieces}")
            position = end
        if position != total:
            raise ValueError(f"rank_pieces must cover [0, {total}) exactly, they end at {position}")
        if any(not pieces for pieces in self.rank_pieces):
            raise ValueError(f"every rank must hold at least one token, got {self.rank_pieces}")
        if self.conv1d_kernel_size is not None and self.conv1d_kernel_size < 1:
            raise ValueError(f"conv1d_kernel_size must be >= 1, got {self.conv1d_kernel_size}")

    # ------------------------------------------------------------------------------------------ layout
    @property
    def num_global_seqs(self) -> int:
        return len(self.seq_offsets) - 1

    @property
    def total_tokens(self) -> int:
        return self.seq_offsets[-1]

    @property
    def local_pieces(self) -> tuple:
        return self.rank_pieces[self.rank]

    @property
    def num_local_tokens(self) -> int:
        return sum(end - start for start, end in self.local_pieces)

    @cached_property
    def segments(self) -> tuple:
        """All segments of all ranks, in global sequence order."""
        found, offsets = [], self.seq_offsets
        for rank, pieces in enumerate(self.rank_pieces):
            local, slot = 0, 0
            for start, end in pieces:
                n = bisect.bisect_right(offsets, start) - 1      # the sequence holding token `start`
                while n < self.num_global_seqs and offsets[n] < end:
                    lo, hi = max(start, offsets[n]), min(end, offsets[n + 1])
                    if lo < hi:
                        found.append(Segment(n, lo, hi, rank, slot, local + lo - start))
                        slot += 1
                    n += 1
                local += end - start
        return tuple(sorted(found, key=lambda s: s.start))

    @cached_property
    def local_segments(self) -> tuple:
        """This rank's segments in local order (by slot)."""
        return tuple(sorted((s for s in self.segments if s.rank == self.rank), key=lambda s: s.slot))

    @cached_property
    def max_segments_per_rank(self) -> int:
        return max(sum(1 for s in self.segments if s.rank == r) for r in range(self.world_size))

    @cached_property
    def _segments_by_seq(self) -> tuple:
        grouped = [[] for _ in range(self.num_global_seqs)]
        for s in self.segments:
            grouped[s.seq].append(s)
        return tuple(tuple(g) for g in grouped)

    def sequence_segments(self, n: int) -> tuple:
        """The segments of global sequence n, in order."""
        return self._segments_by_seq[n]

    def starts_sequence(self, segment: Segment) -> bool:
        """Whether ``segment`` holds the first token of its sequence."""
        return segment.start == self.seq_offsets[segment.seq]

    @cached_property
    def cu_seqlens_cpu(self) -> torch.Tensor:
        """Local pack offsets (int64, CPU): one local sequence per segment, as FLA's rank-local cu_seqlens."""
        offsets = [0]
        for s in self.local_segments:
            offsets.append(offsets[-1] + s.length)
        return torch.tensor(offsets, dtype=torch.long)

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return self.cu_seqlens_cpu

    @property
    def num_seqs(self) -> int:
        """Number of (pieces of) sequences on this rank."""
        return len(self.local_segments)

    @property
    def is_cp_enabled(self) -> bool:
        return self.world_size > 1

    def summary_bytes(self, heads: int, key_dim: int, value_dim: int, element_size: int = 4) -> int:
        """Bytes this rank sends in the summary exchange of one KDA layer: ``M`` (K x K) and ``C`` (K x V) per
        head and segment slot (every rank sends ``max_segments_per_rank`` slots)."""
        return self.max_segments_per_rank * heads * key_dim * (key_dim + value_dim) * element_size


def _split(total: int, parts: int) -> list:
    """``parts`` contiguous ranges of ``[0, total)`` whose sizes differ by at most one."""
    base, extra = divmod(total, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return list(zip(bounds[:-1], bounds[1:]))


def _group_rank(group, rank, world_size):
    if rank is None or world_size is None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("torch.distributed is not initialised: call init_process_group first, or pass "
                             "rank= and world_size=")
        rank = dist.get_rank(group=group) if rank is None else rank
        world_size = dist.get_world_size(group=group) if world_size is None else world_size
    return int(rank), int(world_size)


def build_cp_context(cu_seqlens=None, group=None, conv1d_kernel_size=None, cu_seqlens_cpu=None, *,
                     total_tokens=None, layout="contiguous", rank_pieces=None, rank=None,
                     world_size=None) -> KDAContext:
    """Context of a call whose global pack has offsets ``cu_seqlens`` (``[N + 1]``, before partitioning; or
    one sequence of ``total_tokens`` when None), split over ``group`` (default: the world).

    ``layout="contiguous"`` gives rank r the r-th of W near-equal contiguous parts (flash-linear-attention's
    split); ``"head_tail"`` gives it parts r and 2W-1-r of 2W (causal load balance, as PyTorch's context
    parallel attention).  ``rank_pieces`` (a list, per rank, of global ``(start, end)`` pieces) sets any other
    assignment.  ``rank``/``world_size`` default to the group's.
    """
    rank, world_size = _group_rank(group, rank, world_size)
    source = cu_seqlens_cpu if cu_seqlens_cpu is not None else cu_seqlens
    if source is not None:
        if not isinstance(source, torch.Tensor) or source.dim() != 1 or source.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D tensor [N + 1] of global sequence offsets")
        if source.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {source.dtype}")
        offsets = tuple(int(x) for x in source.tolist())
        if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {list(offsets)}")
    elif total_tokens is not None:
        offsets = (0, int(total_tokens))
    else:
        raise ValueError("build_cp_context needs cu_seqlens (global offsets) or total_tokens")
    total = offsets[-1]
    if rank_pieces is None:
        if layout == "contiguous":
            rank_pieces = [[piece] for piece in _split(total, world_size)]
        elif layout == "head_tail":
            parts = _split(total, 2 * world_size)
            rank_pieces = [[parts[r], parts[2 * world_size - 1 - r]] for r in range(world_size)]
        else:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    pieces = tuple(tuple((int(a), int(b)) for a, b in ps if b > a) for ps in rank_pieces)
    return KDAContext(group=group, rank=rank, world_size=world_size, seq_offsets=offsets, rank_pieces=pieces,
                      conv1d_kernel_size=conv1d_kernel_size)


def shard(x: torch.Tensor, ctx: KDAContext, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of a global tensor (token axis ``dim``), pieces concatenated in local order."""
    return torch.cat([x.narrow(dim, a, b - a) for a, b in ctx.local_pieces], dim)


def unshard(pieces_of_ranks: list, ctx: KDAContext, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard` given every rank's local tensor (e.g. from an all_gather)."""
    parts = []
    for r, local in enumerate(pieces_of_ranks):
        offset = 0
        for a, b in ctx.rank_pieces[r]:
            parts.append((a, local.narrow(dim, offset, b - a)))
            offset += b - a
    return torch.cat([p for _, p in sorted(parts, key=lambda item: item[0])], dim)
