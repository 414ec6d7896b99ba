"""The ``reference`` backend: the PyTorch reference of :mod:`kda_compile.reference` behind the dispatch.

It runs every call on every device (CPU included) and is the end of every fallback chain.  Chunk calls use
the chunkwise form; recurrent calls the token loop, with the serving features of ``fused_recurrent_kda``
(a state pool indexed by ``ssm_state_indices``, speculative decoding via ``num_accepted_tokens``, and the
in-place state write-back).
"""
from __future__ import annotations

import torch

from .dispatch import Backend, KDACall, register_backend
from .reference import finish_state, from_padded, kda_recurrent, kda_reference, kda_reference_chunk_states, prepare


def initial_slots(call: KDACall) -> torch.Tensor:
    """Pool slot holding each sequence's initial state: ``idx[n]`` (1-D indices) or
    ``idx[n, num_accepted_tokens[n] - 1]`` (2-D indices, one slot per draft token)."""
    idx = call.ssm_state_indices.long()
    if idx.dim() == 1:
        return idx
    column = (call.num_accepted_tokens.long() - 1) if call.num_accepted_tokens is not None else idx.new_zeros(idx.shape[0])
    return idx.gather(1, column.unsqueeze(1)).squeeze(1)


def _run_pooled(call: KDACall):
    """Recurrent call whose initial states live in a pool (continuous batching / speculative decoding)."""
    pool, opts = call.initial_state, call.opts
    h0 = pool[initial_slots(call)]
    per_token = call.inplace_final_state and call.ssm_state_indices.dim() == 2
    p = prepare(call.q, call.k, call.v, call.g, call.beta, h0, call.cu_seqlens, call.A_log, call.dt_bias, opts)
    o, S, states = kda_recurrent(p, opts.scale, keep_states=per_token)
    o = from_padded(o, p.bounds, call.v.shape).to(call.v.dtype)
    final = finish_state(S, opts, call.q)
    if call.inplace_final_state:
        idx = call.ssm_state_indices.long()
        if per_token:  # speculative decoding keeps the state after every draft token: token t -> idx[n, t]
            for n, (_, size) in enumerate(p.bounds):
                if size:
                    pool[idx[n, :size]] = finish_state(states[n, :size], opts, call.q).to(pool.dtype)
        else:
            pool[idx] = final.to(pool.dtype)
    return o, final


def run_reference(call: KDACall, config: dict):
    """Run ``call`` with the PyTorch reference; returns ``(o, final_state)``."""
    if call.op == "recurrent" and call.ssm_state_indices is not None:
        return _run_pooled(call)
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
    description="PyTorch reference (chunkwise form for chunk calls, token loop for recurrent calls); any device",
)
register_backend(REFERENCE)
