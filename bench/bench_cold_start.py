"""Cold start: wall time from a fresh Python process to the first finished ``chunk_kda`` call, first with empty
compiler caches, then again in a second process with the caches the first one filled.

    python bench/bench_cold_start.py                      # B2 T8192 H16 D128 bf16, ours and FLA
    python bench/bench_cold_start.py --providers ours
    python bench/bench_cold_start.py --device cpu         # tiny shape on the CPU: checks the script

Each measurement is a new subprocess whose Triton, TileLang and kda_compile cache folders point at a fresh
temporary folder (cold) or at the folder the cold process filled (warm). Import time counts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, header, markdown_table, parser, pick_device  # noqa: E402

PROVIDERS = ("ours", "fla")

# The child process: import the provider, make inputs, time one call. Prints one RESULT line (JSON).
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
provider, device, B, T, H, D = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
try:
    import torch
    if provider == "ours":
        import kda_compile
        fn = kda_compile.chunk_kda
    else:
        from fla.ops.kda import chunk_kda as fn
except ImportError as exc:
    print("RESULT " + json.dumps({"skip": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)
t_import = time.perf_counter() - t0
gen = torch.Generator(device=device).manual_seed(0)
def r(*s):
    return torch.randn(*s, device=device, generator=gen).to(torch.bfloat16)
q, k, v = r(B, T, H, D), r(B, T, H, D), r(B, T, H, D)
g = torch.nn.functional.logsigmoid(r(B, T, H, D).float() + 3)
beta = torch.rand(B, T, H, device=device, generator=gen)
kw = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)
t1 = time.perf_counter()
o, s = fn(q, k, v, g, beta, **kw)
if device == "cuda":
    torch.cuda.synchronize()
t_first = time.perf_counter() - t1
backend = kda_compile.explain(q, k, v, g, beta, **kw).backend.name if provider == "ours" else "fla"
print("RESULT " + json.dumps({"import_s": t_import, "first_call_s": t_first, "backend": backend,
                              "finite": bool(torch.isfinite(o).all())}))
"""


def run_child(provider: str, device: str, shape, cache: str, timeout: float) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(cache, "triton"),
               TILELANG_CACHE_DIR=os.path.join(cache, "tilelang"), KDA_COMPILE_CACHE_DIR=os.path.join(cache, "kda"))
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, provider, device, *map(str, shape)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "process_wall_s": wall}
    return {"error": (proc.stderr or proc.stdout).strip()[-300:]}


def row(provider: str, label: str, r: dict) -> list:
    if "skip" in r or "error" in r:
        return [provider, label, ("skipped: " + r["skip"]) if "skip" in r else "error: " + r["error"],
                float("nan"), float("nan"), float("nan")]
    return [provider, label, r["backend"] + ("" if r["finite"] else " (NON-FINITE OUTPUT)"), r["import_s"],
            r["first_call_s"], r["process_wall_s"]]


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--providers", default=",".join(PROVIDERS), help="ours, fla (default both)")
    p.add_argument("--shape", default=None, help="B,T,H,D (default 2,8192,16,128; CPU 1,64,2,16)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per process (default 300)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    try:
        shape = [int(v) for v in (args.shape or ("1,64,2,16" if device == "cpu" else "2,8192,16,128")).split(",")]
    except ValueError:
        shape = []
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"--shape is B,T,H,D (four positive integers), got {args.shape!r}")
    providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    if set(providers) - set(PROVIDERS):
        raise ValueError(f"--providers takes {PROVIDERS}, got {args.providers!r}")
    rows = []
    for provider in providers:
        with tempfile.TemporaryDirectory(prefix=f"cold-{provider}-") as cache:
            for label in ("cold (empty caches)", "warm (second process)"):
                print(f"[{provider}] {label} ...", file=sys.stderr, flush=True)
                result = run_child(provider, device, shape, cache, args.timeout)
                rows.append(row(provider, label, result))
                if "skip" in result:
                    print(f"[skip] {provider}: {result['skip']}", file=sys.stderr)
                    break
    B, T, H, D = shape
    title = f"Cold start to the first finished chunk_kda, B{B}·T{T}·H{H}, D = {D}, bf16, seconds"
    headers = ["provider", "caches", "backend", "import s", "first call s", "process wall s"]
    emit(f"\n{header(title, device)}\n{markdown_table(headers, rows)}\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
