"""Context-parallel ``chunk_kda``: one sequence (or varlen pack) split over the ranks of a process group.

The segment scan of docs/algorithm.md with the segments on different ranks (docs/context_parallel.md):

1. Pass 1 on every rank, on its own tokens: one ``chunk_kda`` call on the rank's segments as a local varlen
   pack, with the value widened by K zero columns and the state by the K x K identity.  The first V columns
   are the local outputs from a zero state (from the true initial state for a segment that starts its
   sequence) and the final ``C``; the last K columns are ``scale * M_t^T q_t`` (the effective queries,
   scaled) and the segment's transition ``M``.  The call is the ordinary custom op, so it is differentiable
   and runs on whatever backend the dispatch picks.
2. One autograd-aware ``all_gather`` of every rank's summaries ``[C | M]``.
3. Every rank walks the summaries of its sequences' earlier segments in sequence order (any assignment of
   segments to ranks), ``S_in(j + 1) = M_j S_in(j) + C_j``, and fixes its outputs up: ``o += q~ S_in``.

Gradients flow back through the same pieces; the all_gather's backward sums every rank's gradient of each
summary onto the rank that produced it.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from .api import chunk_kda
from .cp_context import KDAContext, Segment, build_cp_context, shard, unshard  # noqa: F401  (re-exported)

# Pass 1 runs as one chunk_kda call with the value K columns wider when K + V is at most this (the widest
# head dim the GPU kernels take), else as two calls of widths V and K.
WIDE_PASS1_MAX = 128

__all__ = ["KDAContext", "build_cp_context", "chunk_kda_cp", "shard", "unshard", "gather_with_backward"]


class _KeepInGraph(torch.autograd.Function):
    """Returns ``x`` unchanged and gives ``anchor`` a zero gradient, so that the collective that produced
    ``anchor`` runs its backward on this rank even when ``x`` does not depend on it (every rank must join)."""

    @staticmethod
    def forward(ctx, x, anchor):
        ctx.anchor_shape, ctx.anchor_dtype = anchor.shape, anchor.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.anchor_shape, dtype=ctx.anchor_dtype)


def gather_with_backward(x: torch.Tensor, ctx: KDAContext) -> list:
    """``all_gather`` of ``x`` over the context's group; differentiable (gloo or NCCL) when ``x`` needs a
    gradient, a plain collective otherwise."""
    if torch.is_grad_enabled() and x.requires_grad:
        with warnings.catch_warnings():  # PyTorch marks it deprecated in favour of a private module
            warnings.simplefilter("ignore", FutureWarning)
            return list(dist_fn.all_gather(x.contiguous(), group=ctx.group))
    out = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(out, x.contiguous(), group=ctx.group)
    return out


def keep_in_graph(x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """``x``, tied to ``anchor`` for autograd (see :class:`_KeepInGraph`) when ``anchor`` needs a gradient."""
    if torch.is_grad_enabled() and anchor.requires_grad:
        return _KeepInGraph.apply(x, anchor)
    return x


def _check_cp(q, v, ctx, initial_state, cu_seqlens, state_v_first):
    if not isinstance(ctx, KDAContext):
        raise TypeError(f"cp_context must be a KDAContext (see build_cp_context), got {type(ctx).__name__}")
    if cu_seqlens is not None:
        raise ValueError("with cp_context, do not pass cu_seqlens: the rank-local offsets come from the context "
                         "(build it from the global cu_seqlens)")
    if q.dim() != 4 or q.shape[0] != 1:
        raise ValueError(f"with cp_context, q must have shape [1, T_local, H, K] (sequences packed along T), "
                         f"got {list(q.shape)}")
    if q.shape[1] != ctx.num_local_tokens:
        raise ValueError(f"q holds {q.shape[1]} tokens but the context gives rank {ctx.rank} "
                         f"{ctx.num_local_tokens} tokens (pieces {list(ctx.local_pieces)})")
    if initial_state is not None:
        N, HV, K, V = ctx.num_global_seqs, v.shape[2], q.shape[3], v.shape[3]
        shape = (N, HV, V, K) if state_v_first else (N, HV, K, V)
        if tuple(initial_state.shape) != shape:
            raise ValueError(f"initial_state must have shape [N, HV, {'V, K' if state_v_first else 'K, V'}] = "
                             f"{list(shape)} (all N sequences of the global pack, the same on every rank), "
                             f"got {list(initial_state.shape)}")


def _pass1_state(ctx, initial_state, HV, K, V, dtype, device):
    """Initial state of each local segment, K + V wide: ``[S0 | I]`` for a segment that starts its sequence
    (S0 = the sequence's initial state or zero), ``[0 | I]`` otherwise."""
    eye = torch.eye(K, dtype=dtype, device=device).expand(HV, K, K)
    rows = []
    for s in ctx.local_segments:
        if ctx.starts_sequence(s) and initial_state is not None:
            start = initial_state[s.seq].to(dtype)
        else:
            start = torch.zeros(HV, K, V, dtype=dtype, device=device)
        rows.append(torch.cat([start, eye], -1))
    return torch.stack(rows)


def _incoming_states(ctx, summaries, V, initial_state, dtype, HV, K, device):
    """Walk every sequence's summaries in order.  Returns ``(incoming, final)``: the state entering each local
    segment that does not start its sequence (by slot), and the final state of every global sequence."""
    incoming, finals = {}, []
    for n in range(ctx.num_global_seqs):
        segs = ctx.sequence_segments(n)
        if not segs:  # an empty sequence: its final state is its initial state
            finals.append(initial_state[n].to(dtype) if initial_state is not None
                          else torch.zeros(HV, K, V, dtype=dtype, device=device))
            continue
        state = None
        for j, s in enumerate(segs):
            summary = summaries[s.rank][s.slot]            # [HV, K, V + K] = [C | M]
            C, M = summary[..., :V], summary[..., V:]
            if j == 0:
                state = C                                  # the first segment ran from the true initial state
                continue
            if s.rank == ctx.rank:
                incoming[s.slot] = state
            state = M @ state + C
        finals.append(state)
    return incoming, torch.stack(finals)


def chunk_kda_cp(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                 use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                 allow_neg_eigval=False, safe_gate=False, lower_bound=None, disable_recompute=False,
                 state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, *, cp_context: KDAContext,
                 chunk_size=64, A_log=None, dt_bias=None, backend=None, pass1_wide=None):
    """``chunk_kda`` on this rank's tokens of a sequence (or varlen pack) split over ``cp_context``'s ranks.

    Arguments as :func:`kda_compile.chunk_kda` (flash-linear-attention's keywords), with ``q, k, v, g, beta``
    this rank's tokens ``[1, T_local, ...]`` (its pieces concatenated in the context's local order; see
    :func:`shard`).  ``initial_state`` ``[N, HV, K, V]`` holds all N sequences of the global pack, the same on
    every rank (only the rank holding a sequence's first token reads it; its gradient lands there).  Returns
    ``(o [1, T_local, HV, V], final_state [N, HV, K, V] or None)``; the final state of every sequence is
    returned on every rank (use it in a loss on one rank only, or its gradient counts once per rank).
    Every rank must call this, and in a training step backpropagate through ``o`` or the final state.
    ``pass1_wide`` forces pass 1 into one call with the value widened to V + K (True) or two calls (False);
    by default one call when ``K + V <= WIDE_PASS1_MAX``.
    """
    _check_cp(q, v, cp_context, initial_state, cu_seqlens if cu_seqlens is not None else cu_seqlens_cpu,
              state_v_first)
    ctx = cp_context
    HV, K, V = v.shape[2], q.shape[3], v.shape[3]
    if initial_state is not None and state_v_first:
        initial_state = initial_state.transpose(-1, -2)
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    # 1. pass 1: local outputs | scaled effective queries, summaries [C | M]
    start = _pass1_state(ctx, initial_state, HV, K, V, state_dtype, q.device)
    run = functools.partial(
        chunk_kda, q, k, g=g, beta=beta, scale=scale, output_final_state=True,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_gate_in_kernel=use_gate_in_kernel,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
        safe_gate=safe_gate, lower_bound=lower_bound, disable_recompute=disable_recompute,
        cu_seqlens=ctx.cu_seqlens_cpu.to(q.device), cu_seqlens_cpu=ctx.cu_seqlens_cpu, chunk_size=chunk_size,
        A_log=A_log, dt_bias=dt_bias, backend=backend)
    zeros = v.new_zeros(*v.shape[:3], K)
    wide = K + V <= WIDE_PASS1_MAX if pass1_wide is None else bool(pass1_wide)
    if wide:
        o_wide, summary = run(v=torch.cat([v, zeros], -1), initial_state=start)
        o_local, q_eff = o_wide[..., :V], o_wide[..., V:]
    else:  # two calls of the usual widths (the kernels' head dims), the intra-chunk work done twice
        o_local, C = run(v=v, initial_state=start[..., :V].contiguous())
        q_eff, M = run(v=zeros, initial_state=start[..., V:].contiguous())
        summary = torch.cat([C, M], -1)

    # 2. one collective: every rank's summaries, padded to the same number of slots
    pad = ctx.max_segments_per_rank - summary.shape[0]
    if pad:
        summary = torch.cat([summary, summary.new_zeros(pad, *summary.shape[1:])])
    gathered = gather_with_backward(summary, ctx)

    # 3. combine the predecessors' summaries in sequence order; fix up the local outputs
    incoming, final = _incoming_states(ctx, gathered, V, initial_state, state_dtype, HV, K, q.device)
    pieces = []
    for s in ctx.local_segments:
        rows = slice(s.local_start, s.local_start + s.length)
        o_seg = o_local[:, rows]
        if s.slot in incoming:
            fix = torch.einsum("bthk,hkv->bthv", q_eff[:, rows].to(state_dtype), incoming[s.slot])
            o_seg = (o_seg.to(state_dtype) + fix).to(v.dtype)
        pieces.append(o_seg)
    o = keep_in_graph(torch.cat(pieces, 1), gathered[ctx.rank])
    if not output_final_state:
        return o, None
    if state_v_first:
        final = final.transpose(-1, -2)
    return o, final.contiguous()
