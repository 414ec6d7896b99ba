"""The intra-GPU sequence split on flat tensors: the segment table and the three passes of the segment scan.

A sequence of n tokens is cut at multiples of ``segment_len`` tokens from its own start (one segment when
``segment_len`` is 0 or n <= segment_len), so where it is cut depends only on its length and the GPU model, never
on the batch or the pack.  The passes are separate callables on flat tensors (``[tokens, heads, dim]``), so a
context-parallel layer can run pass 1 and the fix-up on its own devices and the scan across them:

* :func:`pass1`:  ``kda_fused`` with ``VA = V + K`` state columns (:mod:`.chunk_fused`): local outputs in ``o``,
  scaled effective queries ``qt``, each segment's ``[R | M]`` in ``hs``;
* :func:`scan`:   ``S_in`` of every segment and each sequence's final state (:mod:`.segment_scan`);
* :func:`fixup`:  ``o += qt S_in`` for every segment that is not its sequence's first.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SegmentTable:
    """Segments of one call (int32 tensors on the call's device), in sequence order."""

    seg_chunk0: torch.Tensor   # [NSEG] global index of the segment's first chunk
    seg_nchunks: torch.Tensor  # [NSEG] its chunks (0 for an empty sequence)
    seg_seq: torch.Tensor      # [NSEG] its sequence
    seg_first: torch.Tensor    # [NSEG] 1 for a sequence's first segment
    seq_seg0: torch.Tensor     # [N] each sequence's first segment
    seq_nsegs: torch.Tensor    # [N] segments per sequence
    chunk_seg: torch.Tensor    # [NC] segment of each chunk
    num_segments: int
    split: bool                # some sequence has more than one segment


def segment_table(lengths: tuple, chunk_size: int, segment_len: int, device) -> SegmentTable:
    """The :class:`SegmentTable` of sequences of ``lengths`` tokens (cached).  ``segment_len``: tokens per segment,
    a multiple of ``chunk_size``, or 0 (never split)."""
    if segment_len % chunk_size:
        raise ValueError(f"segment_len must be a multiple of the chunk size {chunk_size}, got {segment_len}")
    return _build(tuple(lengths), chunk_size, segment_len, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _build(lengths: tuple, chunk_size: int, segment_len: int, device: str) -> SegmentTable:
    per_seg = segment_len // chunk_size
    chunk0, nchunks, seq, first, seq0, nsegs, chunk_seg = [], [], [], [], [], [], []
    base = 0
    for n, length in enumerate(lengths):
        count = -(-length // chunk_size)
        sizes = [count] if per_seg == 0 or count <= per_seg else \
            [min(per_seg, count - j) for j in range(0, count, per_seg)]
        seq0.append(len(chunk0))
        nsegs.append(len(sizes))
        for j, size in enumerate(sizes):
            chunk_seg += [len(chunk0)] * size
            chunk0.append(base)
            nchunks.append(size)
            seq.append(n)
            first.append(int(j == 0))
            base += size

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.int32).to(device)

    return SegmentTable(as_tensor(chunk0), as_tensor(nchunks), as_tensor(seq), as_tensor(first), as_tensor(seq0),
                        as_tensor(nsegs), as_tensor(chunk_seg), len(chunk0), max(nsegs, default=1) > 1)


def pass1(kernel, q, k, v, g, beta, A_log, dt_bias, chunks, segs: SegmentTable, h0, split: bool, hc=None):
    """Run the fused kernel over every segment.  Flat inputs ``q, k [TT, H, K]``, ``v [TT, HV, V]``, ``g [TT, HV,
    K]``, ``beta [TT, HV]``, ``A_log [HV]``, ``dt_bias [HV, K]`` (float32), ``chunks`` the chunk table, ``h0`` the
    initial states (user layout; 0 rows without), ``hc`` the chunk-state buffer or None.  Returns ``(o, qt, hs)``:
    outputs ``[TT, HV, V]`` (local to the segment when ``split``), ``qt [TT or 0, HV, K]``, segment states
    ``hs [NSEG, HV, K, V (+ K when split)]`` float32."""
    TT, HV, K = q.shape[0], v.shape[1], q.shape[2]
    V = v.shape[2]
    o = torch.empty(TT, HV, V, dtype=v.dtype, device=v.device)
    qt = q.new_empty(TT if split else 0, HV, K)
    hs = torch.empty(segs.num_segments, HV, K, V + (K if split else 0), dtype=torch.float32, device=v.device)
    if hc is None:
        hc = v.new_empty(0, HV, K, V)
    if segs.num_segments:
        kernel(q, k, v, g, beta, A_log, dt_bias, chunks.chunk_bos, chunks.chunk_len, segs.seg_chunk0,
               segs.seg_nchunks, segs.seg_seq, segs.seg_first, h0, o, qt, hs, hc)
    return o, qt, hs


def scan(kernel, hs, segs: SegmentTable, state_shape: tuple):
    """Combine the segments in order: returns ``(s_in [NSEG, HV, K, V], final [N, *state_shape])``, float32."""
    NSEG, HV, K, _ = hs.shape
    V = hs.shape[3] - K
    s_in = torch.zeros(NSEG, HV, K, V, dtype=torch.float32, device=hs.device)
    final = torch.empty(segs.seq_seg0.shape[0], *state_shape, dtype=torch.float32, device=hs.device)
    if final.shape[0]:
        kernel(hs, segs.seq_seg0, segs.seq_nsegs, s_in, final)
    return s_in, final


def fixup(kernel, qt, s_in, chunks, segs: SegmentTable, o):
    """``o += qt S_in`` for the chunks of every segment after its sequence's first (in place; returns ``o``)."""
    if chunks.num_chunks:
        kernel(qt, s_in, chunks.chunk_bos, chunks.chunk_len, segs.chunk_seg, segs.seg_first, o)
    return o
