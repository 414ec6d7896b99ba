"""Decode (``fused_recurrent_kda``, one token per sequence, state in and out): ours per backend against FLA,
cuDNN-frontend's KDA and a plain copy of the same state bytes (the bandwidth floor).

    python bench/bench_decode.py                        # B = 1, 4, 16, 64; H = 32, D = 128
    python bench/bench_decode.py --backends tilelang --config '{"layout": "column"}'
    python bench/bench_decode.py --device cpu           # tiny sizes on the CPU: checks the script
    python bench/bench_decode.py --batches 1,64 --eager --config-sweep --plots /tmp/plots

``--eager`` adds a table of whole calls made one at a time under ``torch.inference_mode()`` (a sync after each,
median µs): what a model that is not captured in a CUDA graph pays per call, host work included.
``--config-sweep`` adds a table of every config in the Triton decode kernel's search space (graph replays).

bf16 q/k/v, float32 log gate and beta, float32 state ``[B, H, K, V]``, q/k L2-normalised in the kernel.
Times are medians in µs of CUDA-graph replays, so host overhead is excluded for every provider alike.
The sweep writes ``<plots>/decode.png`` (and ``.csv``); ``state GB/s`` = 2 x state bytes / time.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_provider_options, backend_call, check_runs, dense_cu_seqlens, emit,  # noqa: E402
                    make_inputs, markdown_table, measure, parse_config, parse_ints, parser,
                    pick_device, providers_for, run_sweep, Skip)

PEERS = ("fla", "cudnn", "copy")
PLOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots")
API = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)


def decode_inputs(B, H, D, device):
    x = make_inputs(B, 1, H, D, device=device)
    x["h0"] = torch.randn(B, H, D, D, device=device) * 0.1
    return x


def ours(name, x, config):
    import kda_compile

    if config is not None:
        return backend_call("recurrent", x, name, config=config, initial_state=x["h0"], **API)
    check_runs(name, "recurrent", x, initial_state=x["h0"], **API)
    return lambda: kda_compile.fused_recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
                                                   backend=name, **API)


def fla(x):
    from fla.ops.kda import fused_recurrent_kda

    return lambda: fused_recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"], **API)


def cudnn(x):
    """cuDNN-frontend's KDA with T = 1 per sequence; it keeps the state ``[N, H, V, K]``."""
    from cudnn.linear_attention import kimi_delta_attention

    if x["q"].device.type != "cuda":
        raise Skip("cuDNN-frontend runs on CUDA only")
    B, T, H, D = x["q"].shape
    q, k, v = (x[n].reshape(B * T, H, D) for n in ("q", "k", "v"))
    g, beta = x["g"].reshape(B * T, H, D), x["beta"].reshape(B * T, H)
    h0 = x["h0"].transpose(-1, -2).contiguous()
    cu = dense_cu_seqlens(B, T, q.device)
    return lambda: kimi_delta_attention(q, k, v, g, beta, cu, initial_state=h0, output_final_state=True,
                                        use_qk_l2norm_in_kernel=True)


def copy(x):
    """A device copy of the state: the time to read and write its bytes once."""
    dst = torch.empty_like(x["h0"])
    return lambda: dst.copy_(x["h0"])


def builder(provider, x, config):
    if provider.startswith("ours:"):
        return lambda: ours(provider[5:], x, config)
    return {"fla": lambda: fla(x), "cudnn": lambda: cudnn(x), "copy": lambda: copy(x)}[provider]


def decode_us_fn(device, H, D, config):
    """``fn(B, provider) -> µs`` for the sweep; inputs are made once per B."""
    cache = {}

    def decode_us(B, provider):
        if B not in cache:
            cache.clear()
            cache[B] = decode_inputs(B, H, D, device)
        return 1e3 * measure(provider, builder(provider, cache[B], config), device, graph=device == "cuda")

    return decode_us


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--batches", default=None, help="B values (default 1,4,16,64)")
    p.add_argument("--heads", type=int, default=None, help="H (default 32)")
    add_provider_options(p, PEERS)
    p.add_argument("--config", default=None, help="a decode kernel config for our backends, JSON or "
                   "key=value,... (default: what the dispatch picks)")
    p.add_argument("--plots", default=PLOTS, help="folder of the sweep's PNG and CSV (default bench/plots)")
    p.add_argument("--eager", action="store_true", help="also time whole eager calls (inference_mode, sync each)")
    p.add_argument("--config-sweep", action="store_true", help="also time every Triton decode config (graph)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    tiny = device == "cpu"
    H, D = args.heads or (2 if tiny else 32), 16 if tiny else 128
    batches = parse_ints(args.batches or ("1,2" if tiny else "1,4,16,64"), "--batches")
    providers = providers_for(args, device, PEERS)
    config = parse_config(args.config) if args.config else None
    headers, rows = run_sweep(decode_us_fn(device, H, D, config), x_names=["B"], x_vals=batches,
                              providers=providers, ylabel="µs", plot_name="decode", args={},
                              save_path=args.plots, device=device, out=args.out, x_log=True, y_log=True,
                              title=f"Decode (fused_recurrent_kda), 1 token per sequence, H = {H}, D = {D}, bf16, "
                                    f"float32 state, median µs")
    # state bandwidth of every provider: read + write of the float32 state
    gbps = [[row[0], *(2 * row[0] * H * D * D * 4 / (t * 1e-6) / 1e9 for t in row[1:1 + len(providers)])]
            for row in rows]
    emit(markdown_table(["B", *[f"{s} state GB/s" for s in providers]], gbps) + "\n", args.out)
    if args.eager:
        eager_table(batches, providers, H, D, device, args.out)
    if args.config_sweep:
        config_sweep(batches, H, D, device, args.out)
    return 0


def eager_us(fn, device: str, calls: int = 300) -> float:
    """Median µs of one call made alone under inference_mode, a sync after each (host work included)."""
    with torch.inference_mode():
        for _ in range(20):
            fn()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def eager_table(batches, providers, H, D, device, out) -> None:
    rows = []
    for B in batches:
        x = decode_inputs(B, H, D, device)
        row = [B]
        for provider in providers:
            try:
                row.append(eager_us(builder(provider, x, None)(), device))
            except (ImportError, Skip) as exc:
                print(f"[skip] {provider} eager: {exc}", file=sys.stderr, flush=True)
                row.append(float("nan"))
        print(f"eager B={B}: " + ", ".join(f"{p} {t:.1f} µs" for p, t in zip(providers, row[1:])), flush=True)
        rows.append(row)
    emit(f"Eager calls (inference_mode, one call then a sync, median µs), H = {H}, D = {D}\n\n"
         + markdown_table(["B", *providers], rows) + "\n", out)


def config_sweep(batches, H, D, device, out) -> None:
    from kda_compile.kernels_triton.fused_recurrent import get_configs

    configs = get_configs()
    rows = []
    for B in batches:
        x = decode_inputs(B, H, D, device)
        copy_us = 1e3 * measure("copy", lambda: copy(x), device, graph=device == "cuda")
        for config in configs:
            us = 1e3 * measure("ours:triton", lambda: ours("triton", x, config), device, graph=device == "cuda")
            print(f"config sweep B={B} {config}: {us:.2f} µs ({copy_us / us:.0%} of the copy's speed)", flush=True)
            rows.append([B, config["decode_BV"], config["decode_warps"], us, copy_us / us])
    emit(f"Triton decode configs (graph replays, median µs), H = {H}, D = {D}\n\n"
         + markdown_table(["B", "decode_BV", "decode_warps", "µs", "copy time / ours"], rows) + "\n", out)


if __name__ == "__main__":
    sys.exit(main())
