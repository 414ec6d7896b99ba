"""Cold start: wall time from a fresh Python process to the first finished ``chunk_kda`` call, with empty
compiler caches, then again with the caches the first process filled (issue 5, item 4).

Each measurement is a new subprocess whose Triton and TileLang cache dirs point at a fresh temporary folder
(cold) or at the folder the cold run filled (warm).  Peers: FLA's ``chunk_kda`` measured the same way.

    python bench/bench_cold_start.py                     # B2 T8192 H16 D128 bf16, ours and FLA
    python bench/bench_cold_start.py --providers ours --markdown
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
provider, B, T, H, D = sys.argv[1], *map(int, sys.argv[2:6])
if provider == "ours":
    import kda_compile
    fn = kda_compile.chunk_kda
else:
    from fla.ops.kda import chunk_kda as fn
t_import = time.perf_counter() - t0
gen = torch.Generator(device="cuda").manual_seed(0)
def r(*s):
    return torch.randn(*s, device="cuda", generator=gen, dtype=torch.bfloat16)
q, k, v = r(B, T, H, D), r(B, T, H, D), r(B, T, H, D)
g = torch.nn.functional.logsigmoid(r(B, T, H, D).float() + 3).to(torch.bfloat16)
beta = torch.rand(B, T, H, device="cuda", generator=gen).to(torch.bfloat16)
t1 = time.perf_counter()
o, s = fn(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
torch.cuda.synchronize()
t_first = time.perf_counter() - t1
backend = kda_compile.explain(q, k, v, g, beta, use_qk_l2norm_in_kernel=True).backend.name if provider == "ours" else "fla"
print("RESULT " + json.dumps({"import_s": t_import, "first_call_s": t_first, "total_s": time.perf_counter() - t0,
                              "backend": backend, "finite": bool(torch.isfinite(o).all())}))
"""


def run_child(provider: str, shape, cache: str, timeout: float) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(cache, "triton"),
               TILELANG_CACHE_DIR=os.path.join(cache, "tilelang"), KDA_COMPILE_CACHE_DIR=os.path.join(cache, "kda"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, provider, *map(str, shape)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    wall = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            result["process_wall_s"] = wall
            return result
    return {"error": (proc.stderr or proc.stdout)[-800:], "process_wall_s": wall}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", default="ours,fla", help="comma list: ours, fla (default both)")
    parser.add_argument("--shape", default="2,8192,16,128", help="B,T,H,D (default 2,8192,16,128)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per process (default 300)")
    args = parser.parse_args(argv)
    shape = [int(x) for x in args.shape.split(",")]
    rows = []
    for provider in [p.strip() for p in args.providers.split(",") if p.strip()]:
        with tempfile.TemporaryDirectory(prefix=f"cold-{provider}-") as cache:
            for label in ("cold (empty caches)", "warm (second process)"):
                print(f"[{provider}] {label} ...", file=sys.stderr, flush=True)
                try:
                    result = run_child(provider, shape, cache, args.timeout)
                except subprocess.TimeoutExpired:
                    result = {"error": f"timed out after {args.timeout} s"}
                rows.append((provider, label, result))
    print(f"\nCold start, B{shape[0]} T{shape[1]} H{shape[2]} D{shape[3]} bf16, first chunk_kda call\n")
    print("| provider | caches | backend | import (s) | first call (s) | process wall (s) |")
    print("|---|---|---|---|---|---|")
    for provider, label, r in rows:
        if "error" in r:
            print(f"| {provider} | {label} | error: {r['error'][-200:]!r} | | | |")
        else:
            print(f"| {provider} | {label} | {r['backend']} | {r['import_s']:.1f} | {r['first_call_s']:.1f} | "
                  f"{r['process_wall_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
