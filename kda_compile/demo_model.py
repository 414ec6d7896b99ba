"""Model step of ``python -m kda_compile demo``: build the tiny hybrid KDA/MLA model, generate with the cache
(prefill = chunk op, decode = recurrent op), check the cached tokens against recomputing the whole sequence,
and compare tokens/s eager vs ``torch.compile(fullgraph=True)``."""
from __future__ import annotations

import time

import torch

from .generation import compiled_step, generate
from .model import HybridConfig, HybridModel


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed_generate(model, prompt, new_tokens, step, device):
    _sync(device)
    start = time.perf_counter()
    out = generate(model, prompt, new_tokens, step=step)
    _sync(device)
    return out, time.perf_counter() - start


def run_demo(seed: int = 0, device: str | None = None, prompt_len: int = 24, new_tokens: int = 32,
             compile: bool = True, kimi: bool = True) -> dict:
    """Print the demo's lines and return its numbers: ``tokens_per_s_eager``, ``tokens_per_s_compiled``,
    ``compile_s`` (first compiled run, compilation included), ``cache_matches_recompute``,
    ``compiled_matches_eager`` and ``ok``.  tokens/s counts generated tokens over the whole ``generate`` call
    (prefill included).  On CPU it runs single-threaded (the tiny model gains nothing from threads, and on a
    small shared machine extra threads only add scheduling stalls); the thread count is restored after.
    With ``kimi`` it then runs the Kimi Linear checkpoint step (:mod:`kda_compile.demo_kimi`: transformers parity
    when transformers is installed, a printed reason when not); its results are under ``"kimi"``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        result = _run(seed, device, prompt_len, new_tokens, compile)
        if kimi:
            from .demo_kimi import run_kimi_demo
            print()
            result["kimi"] = run_kimi_demo(seed)
            result["ok"] = result["ok"] and result["kimi"]["ok"]
        return result
    finally:
        torch.set_num_threads(threads)


def _run(seed: int, device: str, prompt_len: int, new_tokens: int, compile: bool) -> dict:
    torch.manual_seed(seed)
    config = HybridConfig.tiny()
    model = HybridModel(config).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), device=device)
    print(f"Hybrid model demo: {config.num_layers} layers ({' '.join(config.layer_types)}), hidden "
          f"{config.hidden_size}, {params / 1e6:.2f}M parameters, on {device}")

    generate(model, prompt, 2)                                         # warm-up (dispatch, allocator)
    eager, eager_s = _timed_generate(model, prompt, new_tokens, None, device)
    with torch.no_grad():                                              # greedy without a cache: recompute all
        ref = prompt
        for _ in range(new_tokens):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    cache_ok = torch.equal(eager, ref)
    result = dict(params=params, new_tokens=new_tokens, tokens_per_s_eager=new_tokens / eager_s,
                  cache_matches_recompute=cache_ok)
    print(f"  generate (cache, eager):    {new_tokens} tokens in {eager_s * 1e3:8.1f} ms = "
          f"{result['tokens_per_s_eager']:8.1f} tokens/s; {'same' if cache_ok else 'DIFFERENT'} tokens as "
          f"recomputing the whole sequence each step")

    if compile:
        print("  compiling prefill and decode step with torch.compile(fullgraph=True) (once; ~30-90 s on a small "
              "CPU)...", flush=True)
        step = compiled_step(model)
        _, first_s = _timed_generate(model, prompt, new_tokens, step, device)   # compiles prefill + decode
        compiled, compiled_s = _timed_generate(model, prompt, new_tokens, step, device)
        same = torch.equal(compiled, eager)
        result.update(tokens_per_s_compiled=new_tokens / compiled_s, compile_s=first_s - compiled_s,
                      compiled_matches_eager=same)
        print(f"  generate (cache, compiled): {new_tokens} tokens in {compiled_s * 1e3:8.1f} ms = "
              f"{result['tokens_per_s_compiled']:8.1f} tokens/s "
              f"({result['tokens_per_s_compiled'] / result['tokens_per_s_eager']:.2f}x eager; compiling took "
              f"{result['compile_s']:.0f} s once); {'same' if same else 'DIFFERENT'} tokens as eager")
    result["ok"] = bool(cache_ok and result.get("compiled_matches_eager", True))
    print(f"  {'OK' if result['ok'] else 'MISMATCH'}: cached generation equals recomputation"
          f"{' and compiled equals eager' if compile else ''}")
    return result


if __name__ == "__main__":
    run_demo()
