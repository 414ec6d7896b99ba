"""Forward + backward (training) time and peak memory: ours per backend against FLA, cuDNN-frontend's KDA and
causal SDPA, at the standard shapes, in three settings.

    python bench/bench_chunk_bwd.py                               # all settings, standard shapes
    python bench/bench_chunk_bwd.py --settings prenorm_log --providers ours,fla,cudnn
    python bench/bench_chunk_bwd.py --device cpu                  # tiny sizes on the CPU: checks the script

Settings (D = 128, bf16 q/k/v, float32 g and beta):
    prenorm_log  q/k L2-normalised outside the op, log gate: the form cuDNN-frontend's Hopper backward accepts
    l2_log       q/k L2 norm in the kernel, log gate
    l2_safe      q/k L2 norm in the kernel, safe gate computed in the kernel (lower_bound = -5, A_log, dt_bias)

One timed call is the forward and ``torch.autograd.grad`` of every differentiable input for a random output
gradient.  Memory is ``torch.cuda.max_memory_allocated`` during one such call minus what was allocated before
it (inputs excluded), in MiB.  Times are medians in ms; a provider that does not import or cannot run the
call is skipped with the reason printed.  Each shape's numbers are printed as a ``[row]`` line when measured; a
run stopped by SIGTERM (``timeout``) still writes its setting's table with the rows it has, titled as stopped.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (LOWER_BOUND, STANDARD_SHAPES, TINY_SHAPES, add_provider_options, check_runs,  # noqa: E402
                    dense_cu_seqlens, emit, header, make_inputs, markdown_table, measure, parse_shape,
                    parser, pick_device, providers_for, Skip, stopped_by_sigterm, with_ratios)

SETTINGS = ("prenorm_log", "l2_log", "l2_safe")
PEERS = ("fla", "cudnn", "sdpa")


def setting_inputs(setting, B, T, H, D, device):
    """Inputs of a setting (leaves requiring grad) and the keywords both libraries take."""
    x = make_inputs(B, T, H, D, gate="safe" if setting == "l2_safe" else "log", device=device)
    kw = {}
    if setting == "prenorm_log":
        for n in ("q", "k"):
            x[n] = torch.nn.functional.normalize(x[n].float(), dim=-1).to(x[n].dtype)
    else:
        kw["use_qk_l2norm_in_kernel"] = True
    if setting == "l2_safe":
        kw.update(use_gate_in_kernel=True, safe_gate=True, lower_bound=LOWER_BOUND)
    for t in x.values():
        t.requires_grad_(True)
    return x, kw


def training_call(forward, inputs):
    """``fn()`` running ``forward()`` and the gradients of ``inputs`` for a fixed random output gradient."""
    do = {}

    def fn():
        o = forward()
        if "do" not in do:
            do["do"] = torch.randn_like(o)
        return torch.autograd.grad(o, inputs, do["do"])
    return fn


def ours(name, x, kw):
    import kda_compile
    check_runs(name, "chunk", x, **kw)
    extra = {n: x[n] for n in ("A_log", "dt_bias") if n in x and kw.get("use_gate_in_kernel")}
    leaves = [x[n] for n in ("q", "k", "v", "g", "beta")] + list(extra.values())
    return training_call(lambda: kda_compile.chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], backend=name,
                                                       **extra, **kw)[0], leaves)


def fla(x, kw):
    from fla.ops.kda import chunk_kda
    extra = {n: x[n] for n in ("A_log", "dt_bias") if n in x and kw.get("use_gate_in_kernel")}
    leaves = [x[n] for n in ("q", "k", "v", "g", "beta")] + list(extra.values())
    return training_call(lambda: chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], **extra, **kw)[0], leaves)


def cudnn(x, kw):
    """cuDNN-frontend's KDA: packed ``[B*T, H, D]`` tensors with int32 ``cu_seqlens``."""
    from cudnn.linear_attention import kimi_delta_attention
    if x["q"].device.type != "cuda":
        raise Skip("cuDNN-frontend runs on CUDA only")
    B, T, H, D = x["q"].shape
    cu = dense_cu_seqlens(B, T, x["q"].device)
    ckw = dict(use_qk_l2norm_in_kernel=kw.get("use_qk_l2norm_in_kernel", False))
    leaves = [x[n] for n in ("q", "k", "v", "g", "beta")]
    if kw.get("use_gate_in_kernel"):
        ckw.update(safe_gate=True, gate_lower_bound=LOWER_BOUND, a_log=x["A_log"], dt_bias=x["dt_bias"].view(H, D))
        leaves += [x["A_log"]]

    def forward():
        out = kimi_delta_attention(*(x[n].reshape(B * T, H, -1) for n in ("q", "k", "v", "g")),
                                   x["beta"].reshape(B * T, H), cu, **ckw)
        return out[0] if isinstance(out, tuple) else out
    return training_call(forward, leaves)


def sdpa(x):
    """Causal softmax attention on the same q, k, v (no gate): what a full-attention layer costs."""
    def forward():
        q, k, v = (x[n].transpose(1, 2) for n in ("q", "k", "v"))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return training_call(forward, [x["q"], x["k"], x["v"]])


def build(provider, x, kw):
    if provider.startswith("ours:"):
        return ours(provider[5:], x, kw)
    return {"fla": lambda: fla(x, kw), "cudnn": lambda: cudnn(x, kw), "sdpa": lambda: sdpa(x)}[provider]()


def peak_mib(fn, device) -> float:
    """Peak memory of one call above what was allocated before it (MiB), NaN on the CPU or on failure."""
    if device != "cuda":
        return float("nan")
    try:
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    except Exception:
        return float("nan")


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"any of {', '.join(SETTINGS)} (default all)")
    p.add_argument("--shapes", nargs="*", default=None, help="B,T,H triples (default: the standard shapes)")
    add_provider_options(p, PEERS)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    D = 16 if device == "cpu" else 128
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if set(settings) - set(SETTINGS):
        raise ValueError(f"--settings takes {SETTINGS}, got {args.settings!r}")
    shapes = [parse_shape(s) for s in args.shapes] if args.shapes else TINY_SHAPES if device == "cpu" \
        else STANDARD_SHAPES
    providers = providers_for(args, device, PEERS)
    with stopped_by_sigterm():   # a run stopped by `timeout` still writes the rows it measured
        for setting in settings:
            rows = []
            try:
                for B, T, H in shapes:
                    rows.append(measure_row(setting, B, T, H, D, device, providers))
            finally:
                if rows:
                    emit_table(setting, rows, len(shapes), D, device, providers, args.out)
    return 0


def measure_row(setting, B, T, H, D, device, providers) -> list:
    """``[B, T, H, times..., MiB...]`` of one shape, printed as a ``[row]`` line."""
    x, kw = setting_inputs(setting, B, T, H, D, device)
    times, mems = [], []
    for provider in providers:
        times.append(measure(provider, lambda: build(provider, x, kw), device))
        try:
            mems.append(peak_mib(build(provider, x, kw), device))
        except Exception:
            mems.append(float("nan"))
    print(f"[row] {setting} B{B} T{T} H{H}: " + ", ".join(f"{p} {t:.3f} ms {m:.0f} MiB" for p, t, m in
                                                     zip(providers, times, mems)), flush=True)
    return [B, T, H, *times, *mems]


def emit_table(setting, rows, n_shapes, D, device, providers, out) -> None:
    """The markdown table of one setting, its title saying when the run stopped before its last shape."""
    names = [f"{p} (ms)" for p in providers]
    headers, table = with_ratios(["B", "T", "H", *names, *(f"{p} (MiB)" for p in providers)], rows, providers, "ms")
    headers, table = with_ratios(headers, table, providers, "ms", peer="cudnn")
    stopped = f" (stopped after {len(rows)} of {n_shapes} shapes)" if len(rows) < n_shapes else ""
    title = f"Forward + backward, {setting}, D = {D}, bf16, median ms and peak extra MiB{stopped}"
    emit(f"\n{header(title, device)}\n{markdown_table(headers, table)}\n", out)


if __name__ == "__main__":
    sys.exit(main())
