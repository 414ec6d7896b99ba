"""Cases of the context-parallel hybrid model, run inside the worker processes of
tests/test_context_parallel_model.py (process group: tests/cp_spawn.py).

Every worker builds the same model (rank 0's parameters, broadcast) and the same global tokens and loss
weights, runs the single-process model on every sequence of the pack, then ``model(shard(ids),
cp_context=ctx)`` on its own tokens, and reports the relative error of the logits (reassembled from every
rank) and of every parameter's gradient (summed over the ranks, as DDP reduces them) against the single
process.  The parent process checks the numbers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from cp_cases import all_tokens, rel_err
from kda_compile.context_parallel import build_cp_context, shard
from kda_compile.model import HybridConfig, HybridModel

CONFIGS = {"tiny": HybridConfig.tiny, "tiny_kimi": HybridConfig.tiny_kimi}


def build_model(case) -> HybridModel:
    """The case's model in its dtype, rank 0's parameters on every rank."""
    torch.manual_seed(case.get("seed", 0))
    model = HybridModel(CONFIGS[case["config"]](**case.get("overrides", {})))
    model = model.to(device=case.get("device", "cpu"), dtype=case["dtype"])
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.data, 0)
    return model


def _grads(model) -> dict:
    return {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in model.named_parameters()}


def run_model_case(case, rank, world):
    """``{metric: relative error}``: ``logits`` (with and without autograd) and ``grad <parameter name>`` for
    every parameter."""
    offsets, dtype, device = case["offsets"], case["dtype"], case.get("device", "cpu")
    model = build_model(case)
    gen = torch.Generator().manual_seed(case.get("seed", 0) + 1)
    ids = torch.randint(0, model.config.vocab_size, (1, offsets[-1]), generator=gen).to(device)
    weights = torch.randn(1, offsets[-1], model.config.vocab_size, generator=gen, dtype=torch.float64)
    weights = weights.to(device=device, dtype=dtype)

    # single process: every sequence of the pack on its own
    ref = torch.cat([model(ids[:, a:b]) for a, b in zip(offsets[:-1], offsets[1:]) if b > a], 1)
    (ref * weights).sum().backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    # context parallel: this rank's tokens
    ctx = build_cp_context(torch.tensor(offsets), layout=case.get("layout", "contiguous"),
                           rank_pieces=case.get("pieces"), conv1d_kernel_size=model.config.conv_size)
    logits = model(shard(ids, ctx), cp_context=ctx)
    (logits * shard(weights, ctx)).sum().backward()
    grads = _grads(model)
    for grad in grads.values():
        dist.all_reduce(grad)

    with torch.no_grad():   # inference: the collectives take their plain (not autograd) path
        logits_no_grad = model(shard(ids, ctx), cp_context=ctx)

    errors = {"logits": rel_err(all_tokens(logits, ctx), ref),
              "logits without autograd": rel_err(all_tokens(logits_no_grad, ctx), ref)}
    errors.update({f"grad {name}": rel_err(grads[name], ref_grads[name]) for name in grads})
    return errors
