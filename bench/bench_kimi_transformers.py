"""Prefill and decode tokens/s of transformers' ``KimiLinearForCausalLM`` with its KDA from three providers:

* ``pytorch``: transformers' own pure-PyTorch KDA loops (what a machine without FLA runs);
* ``fla``: flash-linear-attention's ``chunk_kda`` / ``fused_recurrent_kda`` (needs ``fla`` importable);
* ``kda_compile``: kda_compile's, through :mod:`kda_compile.integrations.transformers`.

Everything else in the model (MLA, MoE, convolutions, norms) is transformers' code in every row; only the two KDA
functions change.  The model has random weights (a checkpoint's numbers would be the same).  A provider that
cannot run is a table row saying why; a transformers without Kimi Linear (before 5.24) is said so, and nothing
is measured.

GPU (published layer sizes, 4 layers: KDA KDA KDA MLA, 256 experts top-8; bf16):
    python bench/bench_kimi_transformers.py --preset published --layers 4 --device cuda --dtype bfloat16 \
        --batch 1 --prompt 4096 --decode 64
CPU smoke test:
    python bench/bench_kimi_transformers.py --preset tiny --device cpu --prompt 64 --decode 4

Prefill: one forward of ``B x T`` tokens with ``use_cache=True`` from no cache, tokens/s = B T / time.  Decode:
``--decode`` steps of one token each after that prefill, tokens/s = B steps / time.  Times are the median of
``--reps`` runs after one warm-up run (synchronised on CUDA).  The ``pytorch`` row runs first and decodes greedily;
every other row decodes the same tokens, so its logits answer the same inputs.  "logits vs pytorch" is the
relative error ``||out - ref|| / ||ref||`` of the last prefill logits, and of the decode logits, against the
``pytorch`` row.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import platform
import shlex
import statistics
import sys
import time

import torch

MODULE = "transformers.models.kimi_linear.modeling_kimi_linear"
NAMES = ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention")
PROVIDERS = ("pytorch", "fla", "kda_compile")


def kimi_config_dict(preset: str, layers: int | None) -> dict:
    """A Kimi Linear config.json dict: ``tiny`` (CPU-test sizes) or ``published`` (the 48B-A3B layer sizes)."""
    from kda_compile.model import HybridConfig
    if preset == "tiny":
        cfg = HybridConfig.tiny_kimi()
    else:
        n = layers or 27
        full = [i for i in range(n) if (i + 1) % 4 == 0] or [n - 1]
        cfg = HybridConfig(vocab_size=163840, hidden_size=2304, num_layers=n, mla_layers=tuple(full),
                           intermediate_size=9216, num_heads=32, head_dim=128, v_head_dim=128, gate_rank=128,
                           kda_output_gate_bias=False, rms_norm_eps=1e-5, mla_num_heads=32, mla_qk_head_dim=128,
                           mla_v_head_dim=128, mla_rope_head_dim=64, mla_latent_norm_eps=1e-6, kv_lora_rank=512,
                           q_lora_rank=None, num_experts=256, num_experts_per_token=8, moe_intermediate_size=1024,
                           num_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.446,
                           extra_config={"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    if layers and preset == "tiny":
        raise ValueError("--layers applies to --preset published only")
    return cfg.to_kimi_dict()


def transformers_kimi():
    """(transformers module, modeling module) or (None, reason)."""
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed"
    try:
        return transformers, importlib.import_module(MODULE)
    except ImportError:
        return None, (f"transformers {transformers.__version__} has no kimi_linear (KimiLinearForCausalLM): install "
                      "transformers >= 5.24 to run this benchmark")


def fla_functions():
    from fla.ops.kda import chunk_kda, fused_recurrent_kda

    def chunk(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, **kwargs):
        return chunk_kda(query, key, value, g, beta, initial_state=initial_state,
                         output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)

    def recurrent(query, key, value, g, beta, initial_state, output_final_state, use_qk_l2norm_in_kernel=False,
                  **kwargs):
        return fused_recurrent_kda(query, key, value, g, beta, initial_state=initial_state,
                                   output_final_state=output_final_state,
                                   use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    return chunk, recurrent


def install(modeling, provider: str, originals: dict) -> None:
    """Bind the two KDA names of transformers' modeling module to ``provider``'s functions."""
    from kda_compile.integrations import transformers as integration
    integration.disable()
    if provider == "pytorch":   # the torch function under transformers' hub/FLA wrapper
        fns = [inspect.unwrap(originals[n]) for n in NAMES]
    elif provider == "fla":
        fns = fla_functions()
    else:
        integration.enable()
        return
    for name, fn in zip(NAMES, fns):
        setattr(modeling, name, fn)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def measure(model, ids, decode: int, reps: int, device: str, tokens: torch.Tensor | None = None) -> dict:
    """Median prefill and decode times (s), the last run's prefill logits and decode logits, and the tokens it
    fed.  Decode feeds ``tokens [B, decode]`` when given (the reference row's, so every row's decode logits
    answer the same inputs), else its own greedy tokens."""
    # transformers 5.24 names the cache ``cache``; earlier 5.x releases ``past_key_values``
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def run():
        sync(device)
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        sync(device)
        t1 = time.perf_counter()
        cache, prefill, logits, fed = getattr(out, cache_arg), out.logits[:, -1:], [], []
        nxt = out.logits[:, -1:].argmax(-1)
        for step in range(decode):
            if tokens is not None:
                nxt = tokens[:, step:step + 1]
            fed.append(nxt)
            out = model(nxt, **{cache_arg: cache}, use_cache=True)
            cache, nxt = getattr(out, cache_arg), out.logits[:, -1:].argmax(-1)
            logits.append(out.logits[:, -1:])
        sync(device)
        return (t1 - t0, time.perf_counter() - t1, prefill.float().cpu(),
                torch.cat(logits, 1).float().cpu() if logits else None, torch.cat(fed, 1) if fed else None)

    run()                                                                  # warm-up (kernels, autotuning)
    runs = [run() for _ in range(reps)]
    return {"prefill_s": statistics.median(r[0] for r in runs), "decode_s": statistics.median(r[1] for r in runs),
            "prefill_logits": runs[-1][2], "decode_logits": runs[-1][3], "tokens": runs[-1][4]}


def rel_err(got, want) -> str:
    if got is None or want is None:
        return "-"
    return f"{((got - want).norm() / want.norm()).item():.1e}"


def versions(transformers) -> str:
    parts = [f"torch {torch.__version__}", f"transformers {transformers.__version__ if transformers else '-'}"]
    for name in ("kda_compile", "fla", "triton"):
        try:
            parts.append(f"{name} {importlib.import_module(name).__version__}")
        except Exception:
            parts.append(f"{name} not importable")
    return ", ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("tiny", "published"), default="tiny")
    p.add_argument("--layers", type=int, default=None, help="layers of the published preset (default 27)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64, help="prefill length T")
    p.add_argument("--decode", type=int, default=8, help="decode steps after the prefill")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    transformers, modeling = transformers_kimi()
    print(f"## transformers KimiLinearForCausalLM: KDA providers\n\n- device: {args.device} ({device_name})\n"
          f"- versions: {versions(transformers)}\n- date: {datetime.date.today().isoformat()}\n"
          f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`\n"
          f"- model: {args.preset} preset{f', {args.layers} layers' if args.layers else ''}, random weights, "
          f"{str(dtype).replace('torch.', '')}; B={args.batch}, prompt T={args.prompt}, {args.decode} decode steps\n")
    rows = ["| provider | prefill tokens/s | decode tokens/s | prefill logits vs pytorch | decode logits vs pytorch "
            "| note |", "|---|---:|---:|---:|---:|---|"]
    if transformers is None:
        print(f"**Nothing measured: {modeling}.**\n")
        rows += [f"| {name} | - | - | - | - | skipped: {modeling} |" for name in args.providers]
        print("\n".join(rows))
        return 0
    transformers.logging.set_verbosity_error()
    config = transformers.KimiLinearConfig(**kimi_config_dict(args.preset, args.layers))
    torch.manual_seed(0)
    with torch.device(args.device):
        model = transformers.KimiLinearForCausalLM(config).to(dtype).eval()
    ids = torch.randint(3, config.vocab_size, (args.batch, args.prompt), device=args.device)
    originals = {n: getattr(modeling, n) for n in NAMES}
    ref = None
    order = sorted(args.providers, key=lambda name: name != "pytorch")  # the reference row first
    try:
        for name in order:
            try:
                install(modeling, name, originals)
                r = measure(model, ids, args.decode, args.reps, args.device, None if ref is None else ref["tokens"])
            except Exception as err:  # a provider that cannot run here is a row, not a crash
                rows.append(f"| {name} | - | - | - | - | skipped: {type(err).__name__}: "
                            f"{str(err).splitlines()[0][:120]} |")
                continue
            if name == "pytorch":
                ref = r
            errors = [rel_err(r[key], ref and ref[key]) for key in ("prefill_logits", "decode_logits")]
            note = "transformers' own loops" if name == "pytorch" else ""
            rows.append(f"| {name} | {args.batch * args.prompt / r['prefill_s']:,.0f} | "
                        f"{args.batch * args.decode / max(r['decode_s'], 1e-12):,.1f} | {errors[0]} | {errors[1]} | "
                        f"{note} |")
    finally:
        from kda_compile.integrations import transformers as integration
        integration.disable()
        for n, fn in originals.items():
            setattr(modeling, n, fn)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
