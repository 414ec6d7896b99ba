"""Prefill and decode throughput of the hybrid KDA/MLA model against the same model with every layer full
attention (MLA through SDPA), plus the memory of each one's cache; with ``--train``, the training step instead.

GPU (the numbers in bench/RESULTS.md):
    python bench/bench_model.py --device cuda --seq-lens 8192 32768 --compile
    python bench/bench_model.py --device cuda --train --seq-lens 8192
CPU smoke test (tiny sizes):
    python bench/bench_model.py --device cpu --tiny [--train]

Training (``--train``): one step of B x T tokens, the forward, a next-token cross-entropy loss and its backward
into every parameter (no optimizer), tokens/s = B * T / time, and the CUDA allocator's peak during a step.  Three
models with the same weights: the hybrid with our KDA ops, the hybrid with flash-linear-attention's
``chunk_kda`` in its KDA layers (where ``fla`` imports), and full attention.

Prefill: one ``forward_cached`` of B x T tokens from an empty cache (chunk KDA op; causal SDPA), tokens/s =
B * T / time.  Decode: one ``forward_cached`` step of B tokens against the cache of those T tokens (recurrent
KDA op; absorbed MLA attention over T latents), tokens/s = B / time; the step is functional, so timing it
repeatedly with the same cache repeats the same work.  Times are medians (``triton.testing.do_bench`` on
CUDA for calls under 100 ms, else a median of synchronised wall times).  Cache memory is the bytes of all
cache tensors after the prefill; "peak prefill GiB" is the CUDA allocator's peak during the first prefill,
weights included.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch

from kda_compile import api as kda_api
from kda_compile.generation import compiled_step
from kda_compile.model import HybridConfig, HybridModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

# The GPU model: Kimi-Linear-like layer shapes (head dim 128, latent 512), 8 layers (6 KDA + 2 MLA), ~0.55B
# parameters, so both models and a 32k-token prefill fit easily on one 80 GB GPU.
BENCH_CONFIG = HybridConfig(vocab_size=32000, hidden_size=2048, num_layers=8, intermediate_size=5632,
                            num_heads=16, head_dim=128, v_head_dim=128, mla_num_heads=16, mla_qk_head_dim=128,
                            mla_v_head_dim=128, kv_lora_rank=512, q_lora_rank=1536)


def median_time_s(fn, device: str, reps: int) -> float:
    """Median time of ``fn()`` in seconds.  On CUDA, calls under 100 ms use ``triton.testing.do_bench``
    (median); slower ones (long prefills, where do_bench's 5-run estimate alone would take a while) and CPU
    calls use the median of ``reps`` synchronised wall times, after one warm-up call."""
    cuda = device.startswith("cuda")

    def once() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = once()                                                      # warm-up (and an estimate)
    if cuda and first < 0.1:
        try:
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
        except ImportError:
            pass
    return statistics.median(once() for _ in range(reps))


def bench_one(model: HybridModel, name: str, B: int, T: int, device: str, reps: int, compile: bool) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (B, T), device=device)
    tok = torch.randint(0, model.config.vocab_size, (B, 1), device=device)
    row = dict(model=name, B=B, T=T)
    with torch.no_grad():
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        _, cache = model.forward_cached(ids, None)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        row["cache_mib"] = cache.nbytes() / 2 ** 20
        prefill = median_time_s(lambda: model.forward_cached(ids, None), device, reps)
        decode = median_time_s(lambda: model.forward_cached(tok, cache), device, reps * 4)
        row.update(prefill_ms=prefill * 1e3, prefill_tok_s=B * T / prefill, decode_ms=decode * 1e3,
                   decode_tok_s=B / decode)
        if compile:
            step = compiled_step(model)
            start = time.perf_counter()
            step(tok, cache)                                            # compile the decode step once
            row["compile_s"] = time.perf_counter() - start
            decode_c = median_time_s(lambda: step(tok, cache), device, reps * 4)
            row.update(decode_c_ms=decode_c * 1e3, decode_c_tok_s=B / decode_c)
    del cache
    return row


def fla_chunk_kda():
    """flash-linear-attention's ``chunk_kda`` behind our signature (our ``backend`` keyword dropped; a lower bound
    means FLA's safe gate), or the reason it cannot run here."""
    try:
        from fla.ops.kda import chunk_kda
    except Exception as exc:   # not installed, or no GPU backend for its kernels
        return f"fla not importable ({type(exc).__name__}: {exc})"

    def call(q, k, v, g, beta, backend=None, **kw):
        return chunk_kda(q, k, v, g, beta, safe_gate=kw.get("lower_bound") is not None, **kw)
    return call


def train_one(model: HybridModel, name: str, B: int, T: int, device: str, reps: int) -> dict:
    """Median time and peak memory of one training step (forward, next-token loss, backward)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=gen).to(device)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
    row = dict(model=name, B=B, T=T)
    if device.startswith("cuda"):
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    t = median_time_s(step, device, reps)
    row.update(step_ms=t * 1e3, tok_s=B * T / t)
    model.zero_grad(set_to_none=True)
    return row


def train_table(rows: list) -> str:
    lines = ["| model | B | T | step ms | tokens/s | peak GiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        lines.append(f"| {r['model']} | {r['B']} | {r['T']} | {r['step_ms']:.2f} | {r['tok_s']:,.0f} | {peak} |")
    by = {(r["model"], r["T"]): r for r in rows}
    for (name, T), r in by.items():
        if name == "hybrid":
            for other in ("hybrid, FLA's KDA", "full attention"):
                if (other, T) in by:
                    lines.append(f"\nT={T}: hybrid / {other}: {r['tok_s'] / by[(other, T)]['tok_s']:.2f}x tokens/s")
    return "\n".join(lines)


def run_train(args, config, dtype, seq_lens) -> str:
    """The ``--train`` mode: a training step of each model at each length; returns the markdown table."""
    fla = fla_chunk_kda()
    models = [("hybrid", config, None), ("hybrid, FLA's KDA", config, fla),
              ("full attention", config.full_attention(), None)]
    rows = []
    for name, cfg, chunk_fn in models:
        if isinstance(chunk_fn, str):
            print(f"# {name}: skipped, {chunk_fn}", flush=True)
            continue
        torch.manual_seed(0)
        model = HybridModel(cfg).to(device=args.device, dtype=dtype).train()
        print(f"# {name}: {cfg.layer_types.count('kda')} KDA + {cfg.layer_types.count('mla')} MLA layers, "
              f"training step, {str(dtype).replace('torch.', '')} on {args.device}", flush=True)
        original = kda_api.chunk_kda
        kda_api.chunk_kda = chunk_fn or original   # the layers call kda_api.chunk_kda
        try:
            for T in seq_lens:
                row = train_one(model, name, args.batch, T, args.device, args.reps)
                print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in row.items()), flush=True)
                rows.append(row)
        finally:
            kda_api.chunk_kda = original
        del model
    return train_table(rows)


def table(rows: list, compile: bool) -> str:
    head = ["model", "B", "T", "prefill ms", "prefill tok/s", "decode ms/step", "decode tok/s"]
    if compile:
        head += ["compiled decode ms/step", "compiled decode tok/s"]
    head += ["cache MiB", "peak prefill GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["B"], r["T"], f"{r['prefill_ms']:.2f}", f"{r['prefill_tok_s']:,.0f}",
                 f"{r['decode_ms']:.2f}", f"{r['decode_tok_s']:,.1f}"]
        if compile:
            cells += [f"{r['decode_c_ms']:.2f}", f"{r['decode_c_tok_s']:,.1f}"]
        cells += [f"{r['cache_mib']:.2f}", f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def ratios(rows: list, compile: bool) -> str:
    out = []
    by = {(r["model"], r["T"]): r for r in rows}
    for (name, T), r in by.items():
        full = by.get(("full attention", T))
        if name != "hybrid" or full is None:
            continue
        text = (f"T={T}: hybrid / full attention: prefill {r['prefill_tok_s'] / full['prefill_tok_s']:.2f}x "
                f"tokens/s, decode {r['decode_tok_s'] / full['decode_tok_s']:.2f}x tokens/s")
        if compile:
            text += f" (compiled {r['decode_c_tok_s'] / full['decode_c_tok_s']:.2f}x)"
        text += f", cache {full['cache_mib'] / r['cache_mib']:.2f}x smaller"
        out.append(text)
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="HybridConfig.tiny() (CPU smoke test)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default 8192 32768 (tiny: 64 256)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions on CPU (CUDA: do_bench)")
    p.add_argument("--compile", action="store_true", help="also time the decode step under torch.compile")
    p.add_argument("--train", action="store_true", help="time a training step (forward, loss, backward) instead "
                   "of prefill and decode, also with FLA's chunk_kda in the KDA layers where fla imports")
    p.add_argument("--backend", default=None, help="force the KDA backend (reference, triton, tilelang)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    config = HybridConfig.tiny() if args.tiny else BENCH_CONFIG
    config = dataclasses.replace(config, kda_backend=args.backend,
                                 **({"num_layers": args.layers, "mla_layers": None} if args.layers else {}))
    seq_lens = args.seq_lens or ([64, 256] if args.tiny else [8192, 32768])
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    backend_note = f"KDA backend forced to {args.backend}" if args.backend else "KDA backend chosen by dispatch"
    command = " ".join(argv if argv is not None else sys.argv[1:])
    if args.train:
        text = (f"Training step of the hybrid KDA/MLA model on {device_name}, torch {torch.__version__}, "
                f"{backend_note}.\nCommand: python bench/bench_model.py {command}\n\n"
                f"{run_train(args, config, dtype, seq_lens)}\n")
        emit("\n" + text, args.out)
        return 0
    rows = []
    for name, cfg in (("hybrid", config), ("full attention", config.full_attention())):
        torch.manual_seed(0)
        model = HybridModel(cfg).to(device=args.device, dtype=dtype).eval()
        params = sum(x.numel() for x in model.parameters()) / 1e6
        print(f"# {name}: {cfg.layer_types.count('kda')} KDA + {cfg.layer_types.count('mla')} MLA layers, "
              f"{params:.1f}M parameters, {str(dtype).replace('torch.', '')} on {args.device}", flush=True)
        for T in seq_lens:
            row = bench_one(model, name, args.batch, T, args.device, args.reps, args.compile)
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
            rows.append(row)
        del model
    text = (f"Hybrid KDA/MLA model vs full attention on {device_name}, torch {torch.__version__}, "
            f"{backend_note}.\nCommand: python bench/bench_model.py {command}"
            f"\n\n{table(rows, args.compile)}\n\n{ratios(rows, args.compile)}\n")
    emit("\n" + text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
