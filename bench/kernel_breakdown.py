"""Per-kernel GPU time of one chunkwise forward: ours (Triton backend, any configs) next to FLA's chunk_kda.

    python bench/kernel_breakdown.py [--shapes 2,8192,16 1,32768,16 8,4096,32] [--gates log,safe]
                                     [--config intra_impl=split2,intra_a_warps=8 ...] [--calls 10] [--out FILE]

For each shape and gate, every provider runs ``--calls`` forwards under ``torch.profiler`` (after a warm-up
that compiles); the table gives each kernel's mean GPU time per forward call (µs), its share of the
provider's kernel total, and the total.  This says *where* each implementation spends its time (which
stage to work on); the end-to-end ratios come from bench/bench_chunk.py and bench/device_triton.py
(``triton.testing.do_bench``), not from here, since the profiler adds a little per-launch overhead.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import STANDARD_SHAPES, fla_forward, make_inputs, parse_config, parse_shape, triton_forward  # noqa: E402

def kernel_times(fn, calls: int) -> dict[str, float]:
    """Mean GPU µs per call of each kernel launched by ``fn`` (name -> µs), in launch order."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = collections.OrderedDict()
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = ev.name if len(ev.name) < 60 else ev.name[:57] + "..."
        totals[name] = totals.get(name, 0.0) + ev.time_range.elapsed_us() / calls
    return totals


def table(label: str, times: dict[str, float]) -> list[str]:
    total = sum(times.values()) or float("nan")
    rows = [f"| {label} | **total** | **{total:.1f}** | 100% |"]
    rows += [f"| | `{name}` | {t:.1f} | {100 * t / total:.0f}% |" for name, t in times.items()]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", default=[",".join(map(str, s)) for s in STANDARD_SHAPES],
                   help="B,T,H triples (D = 128, bf16); default: the three standard shapes")
    p.add_argument("--gates", default="log", help="comma-separated: log, safe (default: log)")
    p.add_argument("--config", action="append", default=None,
                   help="our Triton config, JSON or key=value,...; repeatable (default: one run with the shipped "
                        "defaults)")
    p.add_argument("--calls", type=int, default=10, help="profiled forward calls per provider (default 10)")
    p.add_argument("--no-fla", action="store_true", help="leave FLA out")
    p.add_argument("--out", default=None, help="also append the tables (markdown) to this file")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    configs = [parse_config(c) for c in (a.config or ["{}"])]
    lines = []

    def say(text):
        print(text, flush=True)
        lines.append(text)

    for shape in a.shapes:
        B, T, H = parse_shape(shape)
        for gate in a.gates.split(","):
            x = make_inputs(B, T, H, gate=gate)
            say(f"\n### B{B} T{T} H{H}, {gate} gate: GPU µs per forward call ({a.calls} calls, torch.profiler)\n")
            say("| provider | kernel | µs | share |")
            say("|---|---|---|---|")
            for cfg in configs:
                label = f"ours {json.dumps(cfg) if cfg else '(defaults)'}"
                for row in table(label, kernel_times(triton_forward(x, gate, cfg), a.calls)):
                    say(row)
            if not a.no_fla:
                try:
                    for row in table("FLA chunk_kda", kernel_times(fla_forward(x, gate), a.calls)):
                        say(row)
                except Exception as exc:  # a peer that cannot run is a table entry, not a crash
                    say(f"| FLA chunk_kda | failed: {type(exc).__name__}: {str(exc)[:150]} | | |")
            del x
            torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
