"""Compare an exported hybrid model in onnxruntime with the PyTorch model: prefill, then decode steps fed from
the prefill cache (each side from its own cache)."""
from __future__ import annotations

import numpy as np
import torch


def max_rel_err(out, ref) -> float:
    """``max |out - ref| / max |ref|`` (0 when both are empty or ``ref`` is all zeros and ``out`` equals it)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if ref.size == 0:
        return 0.0
    scale = np.abs(ref).max()
    diff = np.abs(out - ref).max()
    return float(diff / scale) if scale > 0 else float(diff)


@torch.no_grad()
def compare(model, runner, batch: int, length: int, decode_steps: int = 16, seed: int = 0) -> dict:
    """Worst max-relative error over logits and every cache tensor: ``{"prefill": e, "decode": e}``."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    logits, cache = model.forward_cached(ids, None)
    ort_logits, ort_cache = runner.prefill(ids.numpy())
    prefill = max(max_rel_err(a, b.float().numpy()) for a, b in zip([ort_logits, *ort_cache],
                                                                    [logits, *cache.flatten()]))
    decode = 0.0
    for _ in range(decode_steps):
        nxt = torch.randint(0, vocab, (batch, 1), generator=gen)
        logits, cache = model.forward_cached(nxt, cache)
        ort_logits, ort_cache = runner.decode(nxt.numpy(), ort_cache)
        decode = max(decode, *(max_rel_err(a, b.float().numpy()) for a, b in zip([ort_logits, *ort_cache],
                                                                               [logits, *cache.flatten()])))
    return {"prefill": prefill, "decode": decode}
