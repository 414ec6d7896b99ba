"""MLA's causal attention under context parallelism: this rank's queries against the latents of the tokens
they may see, wherever those tokens are held.

**Method: an all-gather of the latents, not PyTorch's ring attention.**  PyTorch's own context-parallel
attention (``torch.distributed.tensor.experimental.context_parallel``) does not run on CPU with gloo in torch
2.13: it reroutes only the CUDA SDPA kernels (flash, memory efficient, cuDNN), and the CPU kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``) has no sharding strategy, so the attention call raises
NotImplementedError (with the math kernel forced: "mixed torch.Tensor and DTensor").  Its private ring
(``_templated_ring_attention``) runs the CPU kernel's forward, but takes only its own equal contiguous parts
or equal head + tail halves of one sequence (not the uneven parts, arbitrary pieces or varlen packs a
:class:`~kda_compile.cp_context.KDAContext` describes), and its backward deadlocks on gloo: a rank whose
output does not depend on the other ranks' keys (the first, without load balance) never joins the
all-gather's backward.

So each MLA layer makes one call of ``torch.distributed.nn.functional.all_gather``, the differentiable
collective of torch.distributed (through :func:`kda_compile.context_parallel.gather_with_backward`), on every
rank's cached latents ``[c | k_r]`` (``kv_lora_rank + mla_rope_head_dim`` numbers per token: the smallest
per-token tensor MLA has, far smaller than the expanded keys and values), puts them in global order and
attends with a mask built from the tokens' global positions: a query at position p sees the keys at positions
``[start of p's sequence, p]``.  The gather's backward sums each latent's gradient from every rank onto the
rank that holds it.  Any piece layout works, the load-balanced head + tail one included.

Kimi Linear's MLA has no rotary embedding (``k_r`` is un-rotated), so positions enter only through the mask;
they are the tokens' global positions, as a rotary embedding would need.  Cost per rank and MLA layer:
receives ``(W - 1) * T_local * (kv_lora_rank + R)`` latent numbers and expands the keys up to its last query
(at most the whole sequence's ``T * H * (dk + dv)``); attention work ``T_local x`` visible keys, as balanced
as the layout (``layout="head_tail"`` balances a causal sequence).
"""
from __future__ import annotations

import torch

from .cp_context import KDAContext


def _rank_positions(ctx: KDAContext, rank: int, device) -> torch.Tensor:
    """Global positions of ``rank``'s tokens, in its local order ``[T_rank]``."""
    return torch.cat([torch.arange(a, b, device=device) for a, b in ctx.rank_pieces[rank]])


def local_positions(ctx: KDAContext, device=None) -> torch.Tensor:
    """Global positions (int64) of this rank's tokens, in local order: ``[T_local]``."""
    return _rank_positions(ctx, ctx.rank, device)


def sequence_starts(ctx: KDAContext, positions: torch.Tensor) -> torch.Tensor:
    """Global position of the first token of the sequence holding each of ``positions``."""
    offsets = torch.tensor(ctx.seq_offsets, device=positions.device)
    # the last offset <= p; empty sequences (repeated offsets) resolve to the non-empty one that holds p
    return offsets[torch.searchsorted(offsets, positions, right=True) - 1]


def gather_visible_latents(latent: torch.Tensor, ctx: KDAContext):
    """This rank's latents ``[1, T_local, D]`` -> ``(keys [1, L, D], keep [T_local, L] bool)``.

    ``keys`` are the latents of global positions ``[lo, hi)`` in order: ``lo`` the start of the first sequence
    a local token belongs to, ``hi`` one past the last local token.  ``keep[i, j]`` says whether local token
    i may attend to key j (same sequence, not after it).  Every rank must call it; differentiable."""
    from .context_parallel import gather_with_backward

    if latent.dim() != 3 or latent.shape[0] != 1 or latent.shape[1] != ctx.num_local_tokens:
        raise ValueError(f"latent must have shape [1, {ctx.num_local_tokens}, D] (this rank's tokens), "
                         f"got {list(latent.shape)}")
    device = latent.device
    widest = max(sum(b - a for a, b in pieces) for pieces in ctx.rank_pieces)
    padded = torch.cat([latent, latent.new_zeros(1, widest - latent.shape[1], latent.shape[2])], 1)
    flat = torch.cat(gather_with_backward(padded, ctx), 1)           # [1, W * widest, D], rank-major
    # where global position p sits in `flat`
    slot_of = torch.empty(ctx.total_tokens, dtype=torch.long, device=device)
    for r in range(ctx.world_size):
        positions = _rank_positions(ctx, r, device)
        slot_of[positions] = r * widest + torch.arange(positions.numel(), device=device)
    q_pos = local_positions(ctx, device)
    q_start = sequence_starts(ctx, q_pos)
    lo, hi = int(q_start.min()), int(q_pos.max()) + 1
    keys = flat.index_select(1, slot_of[lo:hi])
    k_pos = torch.arange(lo, hi, device=device)
    keep = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= q_start[:, None])
    return keys, keep
