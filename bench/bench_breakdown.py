"""Where the forward's time goes: GPU time of every kernel of one ``chunk_kda`` call, ours per backend next to
FLA's and cuDNN-frontend's, at the standard shapes (torch.profiler).

    python bench/bench_breakdown.py                             # standard shapes, log gate
    python bench/bench_breakdown.py --gates log,safe --backends triton --config o_BK=64 --config o_BK=128
    python bench/bench_breakdown.py --device cpu                # tiny sizes, CPU ops: checks the script

For each shape and gate, every provider runs ``--calls`` forwards under torch.profiler after a warm-up that
compiles; the table gives each kernel's mean GPU µs per call, its share and the total. The profiler adds a
little per launch, so end-to-end ratios come from bench/bench_chunk.py, not from here. On the CPU the table
lists the ten costliest operators by self CPU time instead.

With ``--training SETTING`` (a setting of bench/bench_chunk_bwd.py: prenorm_log, l2_log, l2_safe) the table is
the same for one forward + backward call (the backward's kernels after the forward's):

    python bench/bench_breakdown.py --training prenorm_log --backends triton

For Nsight Compute, ``--ncu`` only runs a few forward calls of ours (the first backend that can run, the
first shape, gate and config) with nothing timed; the first call compiles, so skip its launches. Every
kernel of ours is named ``kda_*``:

    ncu --clock-control none --kernel-name regex:^kda_ --launch-skip 5 --launch-count 5 \\
        python bench/bench_breakdown.py --ncu --backends triton --shapes 2,8192,16 --calls 3
"""
from __future__ import annotations

import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_chunk import cudnn, fla, ours  # noqa: E402
from common import (GATES, STANDARD_SHAPES, TINY_SHAPES, Skip, emit, header, make_inputs,  # noqa: E402
                    markdown_table, our_backends, parse_config, parse_shape, parser, pick_device)


def kernel_times(fn, calls: int, device: str) -> dict[str, float]:
    """Mean µs per call of each kernel ``fn`` launches (CUDA: GPU time, launch order; CPU: the ten costliest
    operators by self time)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    if device != "cuda":
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
        return {e.key: e.self_cpu_time_total / calls for e in ops}
    totals: dict[str, float] = collections.OrderedDict()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name if len(ev.name) < 60 else ev.name[:57] + "..."
            totals[name] = totals.get(name, 0.0) + ev.time_range.elapsed_us() / calls
    return totals


def provider_rows(label: str, times: dict[str, float]) -> list[list]:
    total = sum(times.values())
    rows = [[label, "**total**", total, "100%"]]
    rows += [["", f"`{name}`", t, f"{100 * t / total:.0f}%" if total else "—"] for name, t in times.items()]
    return rows


def providers(args, device, configs):
    """(label, builder(x, gate)) for every provider: ours per backend and config, then the peers."""
    out = []
    if args.training:
        import bench_chunk_bwd as train
        for name in our_backends(device, args.backends):
            out.append((f"ours:{name}", lambda x, kw, n=name: train.ours(n, x, kw)))
        if not args.no_peers:
            out += [("fla", train.fla), ("cudnn", train.cudnn)]
        return out
    for name in our_backends(device, args.backends):
        for config in configs:
            label = f"ours:{name}" + (f" {config}" if config is not None else "")
            out.append((label, lambda x, gate, n=name, c=config: ours(n, x, gate, c)))
    if not args.no_peers:
        out += [("fla", fla), ("cudnn", cudnn)]
    return out


def run_ncu(args, device, shape, gate, config) -> int:
    """A few forward calls of our first backend that can run here, nothing timed: for a profiler attached from
    outside."""
    x = make_inputs(*shape, D=16 if device == "cpu" else 128, gate=gate, device=device)
    for name in our_backends(device, args.backends):
        try:
            fn = ours(name, x, gate, config)
        except Skip as exc:
            print(f"[skip] ours:{name}: {exc}", file=sys.stderr)
            continue
        for i in range(args.calls):
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            print(f"ours:{name} forward call {i + 1}/{args.calls} done", flush=True)
        return 0
    raise ValueError("--ncu: none of our backends can run here (see `python -m kda_compile info`)")


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--shapes", nargs="*", default=None, help="B,T,H triples (default: the standard shapes)")
    p.add_argument("--gates", default="log", help="log, safe or both (default log)")
    p.add_argument("--backends", default=None, help="our backends (default: every registered one but the "
                   "reference on CUDA)")
    p.add_argument("--config", action="append", default=None, help="a kernel config for ours, JSON or "
                   "key=value,..., or 'tuned' (what the dispatch picks, the default); repeatable")
    p.add_argument("--calls", type=int, default=5, help="profiled forward calls per provider (default 5)")
    p.add_argument("--no-peers", action="store_true", help="leave FLA and cuDNN-frontend out")
    p.add_argument("--training", default=None, metavar="SETTING", help="forward + backward calls in this setting "
                   "of bench_chunk_bwd.py (prenorm_log, l2_log, l2_safe) instead of forwards")
    p.add_argument("--ncu", action="store_true", help="only run --calls forwards of ours (for ncu), no table")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    tiny = device == "cpu"
    shapes = [parse_shape(s) for s in args.shapes] if args.shapes else TINY_SHAPES if tiny else STANDARD_SHAPES
    gates = [g.strip() for g in args.gates.split(",") if g.strip()]
    if set(gates) - set(GATES):
        raise ValueError(f"--gates takes {GATES}, got {args.gates!r}")
    configs = [None if c == "tuned" else parse_config(c) for c in args.config] if args.config else [None]
    if args.ncu:
        return run_ncu(args, device, shapes[0], gates[0], configs[0])
    if args.training:
        import bench_chunk_bwd as train
        if args.training not in train.SETTINGS:
            raise ValueError(f"--training takes one of {train.SETTINGS}, got {args.training!r}")
        gates = [args.training]
    for B, T, H in shapes:
        for gate in gates:
            if args.training:
                x = train.setting_inputs(args.training, B, T, H, 16 if tiny else 128, device)
            else:
                x = (make_inputs(B, T, H, D=16 if tiny else 128, gate=gate, device=device),)
            rows = []
            for label, build in providers(args, device, configs):
                try:
                    rows += provider_rows(label, kernel_times(build(*x, *([] if args.training else [gate])),
                                                              args.calls, device))
                except (ImportError, Skip) as exc:
                    print(f"[skip] {label}: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
                except Exception as exc:  # a peer that fails is a note, not a crash
                    print(f"[fail] {label}: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
            what = "forward + backward" if args.training else "forward"
            unit = f"GPU µs per {what}" if device == "cuda" else f"CPU µs per {what} (self time, top 10 ops)"
            setting = f"{gate} setting" if args.training else f"{gate} gate"
            title = f"Kernels of one {what}, B{B}·T{T}·H{H}, {setting}: {unit} ({args.calls} calls, torch.profiler)"
            emit(f"\n{header(title, device)}\n{markdown_table(['provider', 'kernel', 'µs', 'share'], rows)}\n",
                 args.out)
            del x
    return 0


if __name__ == "__main__":
    sys.exit(main())
