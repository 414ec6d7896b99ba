"""The ``reference`` backend: the PyTorch reference of :mod:`kda_compile.reference` behind the dispatch.

It runs every call on every device (CPU included) and is the end of every fallback chain.  Chunk calls use
the chunkwise form; recurrent calls the token loop, with the serving features of ``fused_recurrent_kda``
(a state pool indexed by ``ssm_state_indices``, speculative decoding via ``num_accepted_tokens``, and the
in-place state write-back); chunk calls take a state pool too (mixed prefill + decode packs).  A negative
slot is padding: that sequence reads and writes nothing and its output is zeros.
"""
from __future__ import annotations

import torch

from .dispatch import Backend, KDACall, register_backend
from .reference import (finish_state, from_padded, kda_recurrent, kda_reference, kda_reference_chunk_states, prepare,
                        sequence_bounds)


def initial_slots(call: KDACall) -> torch.Tensor:
    """Pool slot holding each sequence's initial state: ``idx[n]`` (1-D indices) or
    ``idx[n, num_accepted_tokens[n] - 1]`` (2-D indices, one slot per draft token)."""
    idx = call.ssm_state_indices.long()
    if idx.dim() == 1:
        return idx
    column = (call.num_accepted_tokens.long() - 1) if call.num_accepted_tokens is not None else idx.new_zeros(idx.shape[0])
    return idx.gather(1, column.unsqueeze(1)).squeeze(1)


def gather_states(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``pool[slots]``, with zeros for negative (padding) slots, which are not read."""
    valid = slots >= 0
    states = pool.new_zeros(slots.shape[0], *pool.shape[1:])
    states[valid] = pool[slots[valid]]
    return states


def zero_skipped(o: torch.Tensor, bounds: list[tuple[int, int]], slots: torch.Tensor) -> torch.Tensor:
    """Outputs of the sequences whose slot is negative (padding) set to zero; ``o`` is ``[B, T, ...]``."""
    flat = o.reshape(-1, *o.shape[2:])
    for n in (slots < 0).nonzero().flatten().tolist():
        start, size = bounds[n]
        flat[start:start + size] = 0
    return o


def _run_pooled(call: KDACall):
    """Recurrent call whose initial states live in a pool (continuous batching / speculative decoding).
    A sequence whose initial slot is negative (padding) is skipped: no pool access, zero output and state."""
    pool, opts = call.initial_state, call.opts
    slots = initial_slots(call)
    h0 = gather_states(pool, slots)
    per_token = call.inplace_final_state and call.ssm_state_indices.dim() == 2
    p = prepare(call.q, call.k, call.v, call.g, call.beta, h0, call.cu_seqlens, call.A_log, call.dt_bias, opts)
    o, S, states = kda_recurrent(p, opts.scale, keep_states=per_token)
    o = zero_skipped(from_padded(o, p.bounds, call.v.shape).to(call.v.dtype), p.bounds, slots)
    final = finish_state(S, opts, call.q)
    final[slots < 0] = 0
    if call.inplace_final_state:
        idx = call.ssm_state_indices.long()
        if per_token:  # speculative decoding keeps the state after every draft token: token t -> idx[n, t]
            for n, (_, size) in enumerate(p.bounds):
                row = idx[n, :size]
                if size and slots[n] >= 0:
                    keep = row >= 0
                    pool[row[keep]] = finish_state(states[n, :size], opts, call.q)[keep].to(pool.dtype)
        else:
            keep = slots >= 0
            pool[slots[keep]] = final[keep].to(pool.dtype)
    return o, final


def _run_chunk_pooled(call: KDACall):
    """Chunk call (a mixed prefill + decode pack) with the initial states in pool slots; negative slots
    (padding) skip their sequence.  In place, the final states go back to the slots."""
    pool, slots = call.initial_state, call.ssm_state_indices.long()
    h0 = gather_states(pool, slots)
    o, final = kda_reference(call.q, call.k, call.v, call.g, call.beta, h0, call.cu_seqlens, call.A_log,
                             call.dt_bias, call.opts, algorithm="chunk")
    o = zero_skipped(o, sequence_bounds(call.q.shape[1], call.q.shape[0], call.cu_seqlens), slots)
    final[slots < 0] = 0
    if call.inplace_final_state:
        keep = slots >= 0
        pool[slots[keep]] = final[keep].to(pool.dtype)
    return o, final


def run_reference(call: KDACall, config: dict):
    """Run ``call`` with the PyTorch reference; returns ``(o, final_state)``."""
    if call.ssm_state_indices is not None:
        return _run_pooled(call) if call.op == "recurrent" else _run_chunk_pooled(call)
    algorithm = "chunk" if call.op == "chunk" else "recurrent"
    o, final = kda_reference(call.q, call.k, call.v, call.g, call.beta, call.initial_state, call.cu_seqlens,
                             call.A_log, call.dt_bias, call.opts, algorithm=algorithm)
    if call.op == "recurrent" and call.inplace_final_state:
        call.initial_state.copy_(final)
    return o, final


def run_reference_states(call: KDACall, config: dict):
    """Chunk call plus the state entering each chunk: ``(o, final_state, h)``."""
    return kda_reference_chunk_states(call.q, call.k, call.v, call.g, call.beta, call.initial_state,
                                      call.cu_seqlens, call.A_log, call.dt_bias, call.opts)


def run_reference_backward(call: KDACall, config: dict, do: torch.Tensor, dht: torch.Tensor | None):
    """Gradients by autograd through the chunkwise reference (float32, or float64 for float64 inputs):
    ``(dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias)``, None for absent inputs."""
    names = ("q", "k", "v", "g", "beta", "initial_state", "A_log", "dt_bias")
    inputs = [getattr(call, n) for n in names]
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) if x is not None else None for x in inputs]
        q, k, v, g, beta, h0, A_log, dt_bias = leaves
        o, final = kda_reference(q, k, v, g, beta, h0, call.cu_seqlens, A_log, dt_bias, call.opts, algorithm="chunk")
        outputs, cotangents = [o], [do.to(o.dtype)]
        if dht is not None:
            outputs.append(final)
            cotangents.append(dht.to(final.dtype))
        present = [x for x in leaves if x is not None]
        found = iter(torch.autograd.grad(outputs, present, cotangents, allow_unused=True))
    grads = []
    for x, leaf in zip(inputs, leaves):
        if leaf is None:
            grads.append(None)
        else:
            grad = next(found)
            grads.append(torch.zeros_like(x) if grad is None else grad.to(x.dtype))
    return tuple(grads)


REFERENCE = Backend(
    name="reference",
    supports=lambda call: None,
    run=run_reference,
    run_states=run_reference_states,
    run_backward=run_reference_backward,
    chunk_state_pool=True,
    padding_slots=True,
    description="PyTorch reference (chunkwise form for chunk calls, token loop for recurrent calls); any device",
)
register_backend(REFERENCE)
