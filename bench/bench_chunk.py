"""Forward (``chunk_kda``) time: ours per backend against FLA, cuDNN-frontend's KDA and causal SDPA.

    python bench/bench_chunk.py                         # standard shapes, then time against T; both gates
    python bench/bench_chunk.py --what shapes --gates log
    python bench/bench_chunk.py --backends triton --config o_BK=64 --providers ours,fla
    python bench/bench_chunk.py --device cpu            # tiny sizes on the CPU: checks the script

Inputs (bench/common.py): D = 128, bf16 q/k/v, q/k L2-normalised in the kernel, no initial state. Gate
modes: ``log`` (``g`` given in log space) and ``safe`` (``use_gate_in_kernel=True, safe_gate=True,
lower_bound=-5``, with ``A_log`` and ``dt_bias``). Standard shapes: B2·T8192·H16, B1·T32768·H16,
B8·T4096·H32. The sweep times every provider against T at B2·H16 and writes
``<plots>/chunk_forward_<gate>.png`` (and ``.csv``). Times are medians in ms; a provider that does not import
or cannot run the call is skipped with the reason printed.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (GATES, LOWER_BOUND, STANDARD_SHAPES, TINY_SHAPES, add_provider_options,  # noqa: E402
                    backend_call, check_runs, dense_cu_seqlens, gate_kwargs, make_inputs, measure,
                    parse_config, parse_ints, parse_shape, parser, pick_device, providers_for,
                    run_sweep, Skip)

PEERS = ("fla", "cudnn", "sdpa")
PLOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots")


def ours(name, x, gate, config):
    """kda_compile through the public API with ``backend=name`` (the tuned table's config), or straight
    through the backend with ``config``."""
    import kda_compile

    if config is not None:
        return backend_call("chunk", x, name, config=config, **gate_kwargs(gate))
    kw = dict(A_log=x.get("A_log"), dt_bias=x.get("dt_bias"), **gate_kwargs(gate))
    check_runs(name, "chunk", x, **gate_kwargs(gate))
    return lambda: kda_compile.chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], backend=name, **kw)


def fla(x, gate):
    from fla.ops.kda import chunk_kda

    kw = gate_kwargs(gate)
    if gate != "log":
        kw.update(A_log=x["A_log"], dt_bias=x["dt_bias"])
    return lambda: chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw)


def cudnn(x, gate):
    """cuDNN-frontend's KDA: packed ``[B*T, H, D]`` tensors with int32 ``cu_seqlens``."""
    from cudnn.linear_attention import kimi_delta_attention

    if x["q"].device.type != "cuda":
        raise Skip("cuDNN-frontend runs on CUDA only")
    B, T, H, D = x["q"].shape
    q, k, v = (x[n].reshape(B * T, H, D) for n in ("q", "k", "v"))
    g, beta = x["g"].reshape(B * T, H, D), x["beta"].reshape(B * T, H)
    cu = dense_cu_seqlens(B, T, q.device)
    kw = dict(use_qk_l2norm_in_kernel=True)
    if gate != "log":
        kw.update(safe_gate=True, gate_lower_bound=LOWER_BOUND, a_log=x["A_log"], dt_bias=x["dt_bias"].view(H, D))
    return lambda: kimi_delta_attention(q, k, v, g, beta, cu, **kw)


def sdpa(x):
    """Causal softmax attention on the same q, k, v (the gate does not apply)."""
    q, k, v = (x[n].transpose(1, 2).contiguous() for n in ("q", "k", "v"))
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def builder(provider, x, gate, config):
    if provider.startswith("ours:"):
        return lambda: ours(provider[5:], x, gate, config)
    return {"fla": lambda: fla(x, gate), "cudnn": lambda: cudnn(x, gate), "sdpa": lambda: sdpa(x)}[provider]


def forward_ms_fn(device, D, config):
    """``fn(B, T, H, gate, provider) -> ms`` for the sweep; inputs are made once per point."""
    cache = {}

    def forward_ms(B, T, H, gate, provider):
        key = (B, T, H, gate)
        if key not in cache:
            cache.clear()
            cache[key] = make_inputs(B, T, H, D, gate=gate, device=device)
        return measure(provider, builder(provider, cache[key], gate, config), device)

    return forward_ms


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--what", default="shapes,sweep", help="shapes (the standard shapes table), sweep (time "
                   "against T with a plot), or both (default)")
    p.add_argument("--gates", default=",".join(GATES), help="log, safe or both (default both)")
    p.add_argument("--shapes", nargs="*", default=None, help="B,T,H triples (default: the standard shapes)")
    p.add_argument("--sweep-T", default=None, help="T values of the sweep (default 1024,...,32768)")
    p.add_argument("--sweep-BH", default=None, help="B,H of the sweep (default 2,16)")
    add_provider_options(p, PEERS)
    p.add_argument("--config", default=None, help="a kernel config for our backends, JSON or key=value,... "
                   "(default: what the dispatch picks)")
    p.add_argument("--plots", default=PLOTS, help="folder of the sweep's PNG and CSV (default bench/plots)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    tiny = device == "cpu"
    D = 16 if tiny else 128
    gates = [g.strip() for g in args.gates.split(",") if g.strip()]
    if set(gates) - set(GATES):
        raise ValueError(f"--gates takes {GATES}, got {args.gates!r}")
    shapes = [parse_shape(s) for s in args.shapes] if args.shapes else TINY_SHAPES if tiny else STANDARD_SHAPES
    sweep_T = parse_ints(args.sweep_T or ("32,64,128" if tiny else "1024,2048,4096,8192,16384,32768"), "--sweep-T")
    sweep_B, sweep_H = parse_ints(args.sweep_BH or ("1,2" if tiny else "2,16"), "--sweep-BH")[:2]
    config = parse_config(args.config) if args.config else None
    providers = providers_for(args, device, PEERS)
    fn = forward_ms_fn(device, D, config)
    what = set(args.what.split(","))
    for gate in gates:
        if "shapes" in what:
            run_sweep(fn, x_names=["B", "T", "H"], x_vals=shapes, providers=providers, ylabel="ms",
                      plot_name=None, args={"gate": gate}, save_path="", device=device, out=args.out,
                      title=f"Forward (chunk_kda), {gate} gate, D = {D}, bf16, median ms")
        if "sweep" in what:
            run_sweep(fn, x_names=["T"], x_vals=sweep_T, providers=providers, ylabel="ms",
                      plot_name=f"chunk_forward_{gate}", args={"B": sweep_B, "H": sweep_H, "gate": gate},
                      save_path=args.plots, device=device, out=args.out, x_log=True, y_log=True,
                      title=f"Forward (chunk_kda) against T, B{sweep_B}·H{sweep_H}, {gate} gate, D = {D}, "
                            f"bf16, median ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
