"""Per-call host time of ``chunk_kda`` and ``fused_recurrent_kda``: everything between the API and a kernel.

The calls go to a backend whose ``run`` only allocates the outputs (registered here, for the measurement
only), so the time is the API's checks, option handling, the custom-op entry and the dispatch, nothing else.
Each case runs under ``torch.inference_mode()`` and with grad enabled (inputs that require grad, so the
autograd wrapper of the op is on the path too).  Tiny tensors; CPU always, CUDA when present.

With ``--decode-model`` it also times the hybrid model's decode step (one token per sequence against a
cache of ``--context`` tokens) replayed from a CUDA graph and called eagerly, at B = 1 and B = 64, against
the same model with full attention everywhere: tokens per second (on the CPU: eager only, as a smoke test).

    python bench/bench_overhead.py [--reps 2000] [--device cpu,cuda] [--decode-model [--context 1024]]
    python bench/bench_overhead.py --device cpu --reps 200 --decode-model --tiny-model --context 16
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time

import torch

import kda_compile
from kda_compile import dispatch

STUB = "host_overhead_stub"


def _stub_run(call, config):
    """Outputs of the right shape, no computation: what is left is host overhead."""
    o = torch.empty_like(call.v)
    if not call.output_final_state or call.inplace_final_state:
        return o, None
    p = call.problem
    shape = (p.N, p.HV, p.V, p.K) if call.opts.state_v_first else (p.N, p.HV, p.K, p.V)
    return o, call.q.new_empty(shape, dtype=torch.float32)


def register_stub() -> None:
    """A backend that runs everything and computes nothing (for this measurement only)."""
    dispatch.register_backend(dispatch.Backend(name=STUB, supports=lambda call: "measurement stub",
                                               supports_forced=lambda call: None, run=_stub_run,
                                               description="no-op stub for host-overhead measurement"))


def inputs(device: str, B: int, T: int, H: int = 2, D: int = 16, pool: int = 0, grad: bool = False) -> dict:
    """Tiny random inputs; ``pool`` > 0 adds a state pool and 1-D slot indices (serving)."""
    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    x = dict(q=rand(B, T, H, D), k=rand(B, T, H, D), v=rand(B, T, H, D), g=-rand(B, T, H, D).abs(),
             beta=rand(B, T, H).sigmoid())
    if grad:
        for key in ("q", "k", "v"):
            x[key].requires_grad_(True)
    if pool:
        x["initial_state"] = torch.zeros(pool, H, D, D, device=device)
        x["ssm_state_indices"] = torch.arange(B, device=device, dtype=torch.int32)
    return x


def host_us(fn, device: str, reps: int) -> float:
    """Median per-call wall time in µs over ``reps`` calls (five rounds; the device is synchronised only
    around each round, so a call that syncs by itself shows up as such)."""
    for _ in range(max(10, reps // 20)):
        fn()
    rounds = []
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - start) / reps * 1e6)
        if device == "cuda":
            torch.cuda.synchronize()
    return statistics.median(rounds)


def cases(device: str):
    """(name, mode, callable) of every measured call."""
    from kda_compile import chunk_kda, fused_recurrent_kda
    for mode in ("inference_mode", "grad"):
        grad = mode == "grad"
        dec = inputs(device, B=1, T=1, grad=grad)
        pre = inputs(device, B=1, T=64, grad=grad)
        yield ("fused_recurrent_kda B1 T1", mode,
               lambda x=dec: fused_recurrent_kda(**x, use_qk_l2norm_in_kernel=True, backend=STUB))
        yield ("chunk_kda B1 T64", mode,
               lambda x=pre: chunk_kda(**x, use_qk_l2norm_in_kernel=True, backend=STUB))
        yield ("chunk_kda B1 T64, final state", mode,
               lambda x=pre: chunk_kda(**x, output_final_state=True, backend=STUB))
        if not grad:
            pool = inputs(device, B=1, T=1, pool=8)
            yield ("fused_recurrent_kda B1 T1, pool in place", mode,
                   lambda x=pool: fused_recurrent_kda(**x, inplace_final_state=True, backend=STUB))
            yield ("fused_recurrent_kda B1 T1, default dispatch", mode,
                   lambda x=dec: fused_recurrent_kda(**x, use_qk_l2norm_in_kernel=True))


def measure_overhead(devices: list[str], reps: int) -> list[list]:
    rows = []
    for device in devices:
        for name, mode, fn in cases(device):
            if mode == "inference_mode":
                with torch.inference_mode():
                    us = host_us(fn, device, reps)
            else:
                us = host_us(fn, device, reps)
            rows.append([device, name, mode, f"{us:.1f}"])
            print(f"  {device} {name} [{mode}]: {us:.1f} µs", file=sys.stderr)
    return rows


# ------------------------------------------------------------------------------ model decode under graphs

def decode_tokens_per_s(config, B: int, context: int, device: str, graph: bool, reps: int = 100) -> float:
    """Tokens/s of one decode step (B tokens against a cache of ``context`` tokens), replayed from a CUDA
    graph captured around ``forward_cached`` (``graph``), or called eagerly.  The step is functional, so each
    replay repeats the same work."""
    from kda_compile.model import HybridModel
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = HybridModel(config).to(device=device, dtype=dtype).eval()
    with torch.inference_mode():
        prompt = torch.randint(0, config.vocab_size, (B, context), device=device)
        _, cache = model.forward_cached(prompt, None)
        token = torch.randint(0, config.vocab_size, (B, 1), device=device)
        step = lambda: model.forward_cached(token, cache)  # noqa: E731
        for _ in range(3):  # warm-up: compiles the kernels, fills the dispatch cache
            step()
        if graph:
            torch.cuda.synchronize()
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                step()
            step = captured.replay
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    return B * reps / (time.perf_counter() - start)


def measure_model(device: str, tiny: bool, context: int) -> list[list]:
    """Decode tokens/s of the hybrid model and of the same model with full attention, B = 1 and 64."""
    from kda_compile.model import HybridConfig
    if tiny:
        config = HybridConfig.tiny()
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_model import BENCH_CONFIG as config
    modes = ("graph", "eager") if device == "cuda" else ("eager",)
    rows = []
    for B in (1, 64):
        for mode in modes:
            kda = decode_tokens_per_s(config, B, context, device, mode == "graph")
            full = decode_tokens_per_s(config.full_attention(), B, context, device, mode == "graph")
            rows.append([B, context, mode, f"{kda:.0f}", f"{full:.0f}", f"{kda / full:.2f}"])
            print(f"  decode B{B} {mode}: hybrid {kda:.0f} tok/s, full attention {full:.0f} tok/s", file=sys.stderr)
    return rows


def table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def header(devices: list[str]) -> str:
    gpu = torch.cuda.get_device_name() if "cuda" in devices else "none"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return (f"device: {platform.processor() or platform.machine()} CPU; GPU: {gpu}\n"
            f"versions: kda_compile {getattr(kda_compile, '__version__', '?')}, torch {torch.__version__}, "
            f"triton {triton_version}, python {platform.python_version()}\n"
            f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
            f"command: {' '.join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000, help="calls per timing round")
    ap.add_argument("--device", default=None, help="cpu, cuda or cpu,cuda (default: cpu, and cuda when present)")
    ap.add_argument("--decode-model", action="store_true",
                    help="also time the model's decode step (CUDA graph and eager on CUDA; eager on the CPU)")
    ap.add_argument("--context", type=int, default=1024, help="cached tokens before the decode step")
    ap.add_argument("--tiny-model", action="store_true", help="HybridConfig.tiny() instead of the bench model")
    args = ap.parse_args(argv)
    devices = args.device.split(",") if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    register_stub()
    print(header(devices))
    print("Per-call host time (µs, median of 5 rounds), backend: a no-op stub that only allocates the outputs\n")
    print(table(["device", "call", "mode", "µs / call"], measure_overhead(devices, args.reps)))
    if args.decode_model:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        name = "HybridConfig.tiny()" if args.tiny_model else "bench_model.BENCH_CONFIG"
        print(f"\nDecode step of the model ({name}), tokens/s, hybrid KDA/MLA against full attention\n")
        print(table(["B", "context", "mode", "KDA hybrid", "full attention", "ratio"],
                    measure_model(device, args.tiny_model, args.context)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
