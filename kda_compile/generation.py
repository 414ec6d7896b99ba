"""Token generation with the hybrid model's cache: one prefill (chunk KDA op), then one decode step per token
(recurrent KDA op).  The step function is pluggable so a ``torch.compile``-d model can drive it."""
from __future__ import annotations

from typing import Callable

import torch


def pick_next(logits: torch.Tensor, greedy: bool = True, temperature: float = 1.0, top_k: int | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ``[B, 1]`` from last-position logits ``[B, vocab]``: argmax, or a sample from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest."""
    if greedy:
        return logits.argmax(-1, keepdim=True)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             step: Callable | None = None, eos_token_id: int | None = None) -> torch.Tensor:
    """Extend the prompt ``input_ids [B, T]`` by ``max_new_tokens`` tokens; returns ``[B, T + n]``.

    ``step(ids, cache) -> (logits, new_cache)`` defaults to ``model.forward_cached``; pass e.g.
    ``lambda ids, cache: compiled(ids, cache, use_cache=True)`` with ``compiled = torch.compile(model,
    fullgraph=True)`` to run compiled.  With ``eos_token_id``, stops early once every sequence has emitted it
    (later tokens of finished sequences are ``eos_token_id``)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    step = step or model.forward_cached
    tokens = [input_ids]
    if max_new_tokens == 0:
        return input_ids
    logits, cache = step(input_ids, None)
    done = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        nxt = pick_next(logits[:, -1], greedy, temperature, top_k, generator).to(input_ids.dtype)
        if eos_token_id is not None:
            nxt = nxt.masked_fill(done, eos_token_id)
            done = done | (nxt == eos_token_id)
        tokens.append(nxt)
        if i + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            break
        logits, cache = step(nxt, cache)
    return torch.cat(tokens, dim=1)


def compiled_step(model, **compile_kwargs) -> Callable:
    """A ``step(ids, cache) -> (logits, new_cache)`` running ``torch.compile(model, fullgraph=True)``.

    The latent length of the MLA caches grows by one every decode step; it is marked dynamic so a decode
    step compiles once, not once per length."""
    compiled = torch.compile(model, fullgraph=True, **compile_kwargs)

    def step(ids: torch.Tensor, cache=None):
        if cache is not None:
            for layer in cache.layers:
                if len(layer) == 1 and layer[0].shape[1] > 1:   # sizes 0 and 1 are always specialised
                    torch._dynamo.maybe_mark_dynamic(layer[0], 1)
        return compiled(ids, cache, use_cache=True)
    return step
