"""The short causal convolution's halo under context parallelism.

KDA's q/k/v pass through a depthwise causal convolution of width ``W`` (``conv1d_kernel_size``) first; the
first tokens of a piece then read the ``W - 1`` tokens before it, which another rank holds (several ranks,
when pieces are shorter than ``W - 1``).  :func:`exchange_conv_halo` fetches them with one autograd-aware
all_gather of every piece's last ``W - 1`` tokens.  Tokens before the start of the piece's sequence are zero
(a varlen convolution starts every sequence afresh).
"""
from __future__ import annotations

import torch

from .context_parallel import gather_with_backward, keep_in_graph
from .cp_context import KDAContext


def _tails(x: torch.Tensor, ctx: KDAContext, width: int) -> torch.Tensor:
    """``[max pieces, width, D]``: the last ``width`` tokens of each local piece (zero-padded in front)."""
    max_pieces = max(len(p) for p in ctx.rank_pieces)
    rows, offset = [], 0
    for a, b in ctx.local_pieces:
        n = b - a
        take = min(n, width)
        tail = x[0, offset + n - take: offset + n]
        rows.append(torch.cat([tail.new_zeros(width - take, *tail.shape[1:]), tail]))
        offset += n
    rows += [x.new_zeros(width, *x.shape[2:])] * (max_pieces - len(rows))
    return torch.stack(rows)


def exchange_conv_halo(x: torch.Tensor, ctx: KDAContext, conv_size: int | None = None) -> torch.Tensor:
    """The ``conv_size - 1`` tokens before each of this rank's pieces: ``[pieces, conv_size - 1, ...]``.

    ``x``: this rank's tokens ``[1, T_local, ...]`` (pieces concatenated in local order).  Row ``i`` of the
    result is the halo of local piece ``i``, oldest token first, zero where a token precedes the piece's
    sequence.  Every rank must call it; gradients flow back to the ranks that hold the halo tokens.
    ``conv_size`` defaults to the context's ``conv1d_kernel_size``.
    """
    conv_size = ctx.conv1d_kernel_size if conv_size is None else conv_size
    if conv_size is None or conv_size < 1:
        raise ValueError("exchange_conv_halo needs conv_size >= 1 (or a context built with conv1d_kernel_size)")
    if x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != ctx.num_local_tokens:
        raise ValueError(f"x must have shape [1, {ctx.num_local_tokens}, ...] (this rank's tokens), "
                         f"got {list(x.shape)}")
    width = conv_size - 1
    if width == 0:
        return x.new_zeros(len(ctx.local_pieces), 0, *x.shape[2:])
    gathered = gather_with_backward(_tails(x, ctx, width), ctx)
    # every piece in global order: (start, end, rank, index among that rank's pieces)
    order = sorted((a, b, r, i) for r, ps in enumerate(ctx.rank_pieces) for i, (a, b) in enumerate(ps))
    offsets = ctx.seq_offsets
    halos = []
    for a, _ in ctx.local_pieces:
        # the start of the sequence that holds token a (tokens before it are zero)
        seq_start = max(offsets[n] for n in range(len(offsets) - 1) if offsets[n] <= a < offsets[n + 1])
        need_from = max(a - width, seq_start)
        parts, position = [], a           # collect [need_from, a) walking the pieces backwards
        for start, end, r, i in reversed(order):
            if position <= need_from:
                break
            if start < position <= end:
                lo = max(start, need_from, end - width)
                # gathered[r][i] holds tokens [end - width, end); take [lo, position)
                parts.append(gathered[r][i, width - (end - lo): width - (end - position)])
                position = lo
        known = torch.cat(parts[::-1]) if parts else x.new_zeros(0, *x.shape[2:])
        halos.append(torch.cat([x.new_zeros(width - known.shape[0], *x.shape[2:]), known]))
    return keep_in_graph(torch.stack(halos), gathered[ctx.rank])


def conv_runs(x: torch.Tensor, ctx: KDAContext, conv_size: int) -> list:
    """This rank's tokens cut into the stretches a causal convolution sees as one stream, each with the inputs
    before it: ``[(x_run [1, n, C], conv_state [1, C, conv_size - 1] or None), ...]`` in local order.

    A run is a segment (a local piece cut at the sequence starts inside it, see :class:`KDAContext`).  The
    first run of a piece continues from the piece's halo (:func:`exchange_conv_halo`, zeros where it precedes
    the run's sequence); a later run starts its sequence, so its state is None (zeros).  Convolving every run
    from its state (``layers.causal_depthwise_conv``) and concatenating gives the rank's share of the global
    convolution.  ``x [1, T_local, C]``; every rank must call it (the halo is a collective).
    """
    halo = exchange_conv_halo(x, ctx, conv_size)                     # [pieces, conv_size - 1, C]
    piece_of_start, offset = {}, 0
    for i, (a, b) in enumerate(ctx.local_pieces):
        piece_of_start[offset] = i
        offset += b - a
    runs = []
    for s in ctx.local_segments:
        piece = piece_of_start.get(s.local_start)
        state = None if piece is None else halo[piece].transpose(0, 1).unsqueeze(0)
        runs.append((x[:, s.local_start:s.local_start + s.length], state))
    return runs
