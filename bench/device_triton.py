"""Triton backend on the GPU: correctness at the standard shapes and timing against FLA, in one run.

    python bench/device_triton.py [--out DIR] [--budget SECONDS] [--sections correctness,timing,...] [--config k=v,...]

1. Correctness: relative error of ``chunk_kda(backend="triton")`` (and of FLA's chunk_kda on the same
   inputs) against the float64 recurrence at the standard shapes (D=128, bf16) and at T=65536.
2. Timing (median ms, ``triton.testing.do_bench``): ours vs ``fla.ops.kda.chunk_kda`` in the same process,
   log-space gate and safe gate, q/k L2-normalised in the kernel (bench/common.py inputs), per-stage times.
3. Config sweep per stage (the search space that kernels_triton declares), then the best combination.
4. Decode: ``fused_recurrent_kda`` vs FLA's at B=1 and B=64, H=32, one token, state in and out.
5. ``pytest tests/test_triton_gpu.py``.

Sections run in that order and are skipped once ``--budget`` seconds have passed; everything is printed
and appended to ``DIR/triton_device.md``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (STANDARD_SHAPES, fla_forward, gate_kwargs, kda_options, make_inputs,  # noqa: E402
                    parse_config, parse_shape, time_ms, triton_forward, versions)

T_START = time.time()
LOG = None


def say(text=""):
    print(text, flush=True)
    if LOG:
        with open(LOG, "a") as f:
            f.write(text + "\n")


def elapsed() -> float:
    return time.time() - T_START


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm()).item()


def ours(x, gate, config=None):
    """Our forward through the public API (config None) or straight through the backend with a config."""
    import kda_compile
    if config is not None:
        return triton_forward(x, gate, config)
    kw = dict(use_qk_l2norm_in_kernel=True, **gate_kwargs(gate))
    return lambda: kda_compile.chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], A_log=x.get("A_log"),
                                         dt_bias=x.get("dt_bias"), backend="triton", **kw)[0]


def reference(x, gate):
    """float64 token recurrence on the GPU."""
    from kda_compile.reference import kda_reference
    d = {n: t.double() for n, t in x.items()}
    o, _ = kda_reference(d["q"], d["k"], d["v"], d["g"], d["beta"], None, None, d.get("A_log"), d.get("dt_bias"),
                         kda_options(x, gate), algorithm="recurrent")
    return o


def correctness(shapes, gates, config=None):
    say(f"\n## Correctness: relative error vs the float64 recurrence (bf16, D=128), ours with "
        f"{config or 'the default config'}\n")
    say("| shape | gate | ours (triton) | FLA chunk_kda | ours finite |")
    say("|---|---|---|---|---|")
    for (B, T, H) in shapes:
        for gate in gates:
            x = make_inputs(B, T, H, gate=gate)
            o = ours(x, gate, config)()
            try:
                of = fla_forward(x, gate)()
            except Exception as exc:  # report, keep going
                say(f"FLA failed: {type(exc).__name__}: {str(exc)[:200]}")
                of = None
            t = time.time()
            ref = reference(x, gate)
            e_ours = rel(o, ref)
            e_fla = rel(of, ref) if of is not None else float("nan")
            say(f"| B{B} T{T} H{H} | {gate} | {e_ours:.2e} | {e_fla:.2e} | {bool(torch.isfinite(o).all())} |"
                f" <!-- ref {time.time() - t:.0f}s, at {elapsed():.0f}s -->")
            del x, o, of, ref
            torch.cuda.empty_cache()


def stage_times(x, gate, config, only=None):
    """Median ms of each stage alone (inputs from one full run); ``only`` names one stage to time."""
    from kda_compile.kernels_triton import chunk_intra, chunk_o, chunk_state
    from kda_compile.kernels_triton.chunk_fwd import chunk_table, default_config
    B, T, H, K = x["q"].shape
    HV = x["v"].shape[2]
    cfg = {**default_config(), **config}
    opts = kda_options(x, gate)
    table = chunk_table(B, T, None, 64, x["q"].device)
    q, k, v = (x[n].reshape(B * T, H, K) for n in "qkv")
    g, beta = x["g"].reshape(B * T, HV, K), x["beta"].reshape(B * T, HV)
    A_log, dt_bias = x.get("A_log"), x.get("dt_bias")
    aqk, w, u, qg, kg, gl = chunk_intra.chunk_intra(q, k, v, g, beta, A_log, dt_bias, opts, table, cfg)
    h, vn, _ = chunk_state.chunk_state(kg, w, u, gl, None, table, False, False, cfg)
    fns = {
        "intra": lambda: chunk_intra.chunk_intra(q, k, v, g, beta, A_log, dt_bias, opts, table, cfg),
        "state": lambda: chunk_state.chunk_state(kg, w, u, gl, None, table, False, False, cfg),
        "o": lambda: chunk_o.chunk_o(qg, h, aqk, vn, opts.scale, table, cfg),
    }
    return {name: time_ms(fn) for name, fn in fns.items() if only in (None, name)}


def timing(shapes, gates, config=None, label="default config"):
    say(f"\n## Forward time (ms, median), ours ({label}) vs FLA chunk_kda, q/k L2 norm in kernel\n")
    say("| shape | gate | ours | FLA | FLA / ours | ours: intra / state / o |")
    say("|---|---|---|---|---|---|")
    for (B, T, H) in shapes:
        for gate in gates:
            x = make_inputs(B, T, H, gate=gate)
            t_ours = time_ms(ours(x, gate, config))
            try:
                t_fla = time_ms(fla_forward(x, gate))
            except Exception as exc:
                say(f"FLA failed: {type(exc).__name__}: {str(exc)[:200]}")
                t_fla = float("nan")
            st = stage_times(x, gate, config or {})
            say(f"| B{B} T{T} H{H} | {gate} | {t_ours:.3f} | {t_fla:.3f} | {t_fla / t_ours:.2f}x | "
                f"{st['intra']:.3f} / {st['state']:.3f} / {st['o']:.3f} |")
            del x
            torch.cuda.empty_cache()


def sweep(shapes, budget, stages=("intra", "state", "o")):
    """Each stage's configs alone (others at default) at each shape; returns the best config per shape."""
    from kda_compile.kernels_triton import chunk_intra, chunk_o, chunk_state
    say("\n## Config sweep (stage ms, log gate)\n")
    best = {}
    for (B, T, H) in shapes:
        x = make_inputs(B, T, H, gate="log")
        chosen = {}
        for name, stage in (("intra", chunk_intra), ("state", chunk_state), ("o", chunk_o)):
            if name not in stages:
                continue
            rows = []
            for cfg in stage.get_configs():
                if elapsed() > budget:
                    break
                if name == "intra" and cfg.get("intra_precision", "tf32") != "tf32":
                    continue  # precision variants: checked for error, not for speed
                try:
                    rows.append((stage_times(x, "log", cfg, only=name)[name], cfg))
                except Exception as exc:
                    say(f"  {name} {cfg}: failed {type(exc).__name__}: {str(exc)[:120]}")
            rows.sort(key=lambda r: r[0])
            for t, cfg in rows[:3]:
                say(f"  B{B} T{T} H{H} {name}: {t:.3f} ms {cfg}")
            if rows:
                chosen.update(rows[0][1])
        best[(B, T, H)] = chosen
        say(f"  best B{B} T{T} H{H}: {chosen}")
        del x
        torch.cuda.empty_cache()
    return best


def precision_check():
    """Error of the precision variants of the intra stage at the first standard shape."""
    say("\n## Precision variants (B2 T8192 H16, log gate): rel. error vs float64 recurrence\n")
    x = make_inputs(2, 8192, 16, gate="log")
    ref = reference(x, "log")
    for cfg in ({"intra_precision": "tf32", "solve_precision": "tf32"},
                {"intra_precision": "tf32", "solve_precision": "ieee"},
                {"intra_precision": "tf32x3", "solve_precision": "ieee"}):
        try:
            o = ours(x, "log", cfg)()
            say(f"  {cfg}: {rel(o, ref):.3e}, {time_ms(ours(x, 'log', cfg)):.3f} ms")
        except Exception as exc:
            say(f"  {cfg}: failed {type(exc).__name__}: {str(exc)[:160]}")


def graph_time(fn):
    """CUDA-graph median (launch-bound decode), or the plain median when capture fails."""
    try:
        return time_ms(fn, graph=True), "graph"
    except Exception as exc:
        say(f"  (graph capture failed: {type(exc).__name__}: {str(exc)[:120]}; plain timing)")
        torch.cuda.synchronize()
        return time_ms(fn), "plain"


def decode():
    import kda_compile
    say("\n## Decode (ms, CUDA graph median): fused_recurrent_kda, T=1, H=32, D=128, state in/out\n")
    say("| B | ours | FLA | FLA / ours | ours err vs fp64 |")
    say("|---|---|---|---|---|")
    from fla.ops.kda import fused_recurrent_kda as fla_rec
    for B in (1, 64):
        x = make_inputs(B, 1, 32, gate="log")
        h0 = torch.randn(B, 32, 128, 128, device="cuda") * 0.1
        kw = dict(use_qk_l2norm_in_kernel=True, initial_state=h0, output_final_state=True)
        mine = lambda: kda_compile.fused_recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], backend="triton",
                                                       **kw)
        theirs = lambda: fla_rec(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw)
        o, s = mine()
        d = {n: t.double() for n, t in x.items()}
        ro, rs = kda_compile.fused_recurrent_kda(d["q"], d["k"], d["v"], d["g"], d["beta"], backend="reference",
                                                 use_qk_l2norm_in_kernel=True, initial_state=h0.double(),
                                                 output_final_state=True)
        t_m, _ = graph_time(mine)
        try:
            t_f, _ = graph_time(theirs)
        except Exception as exc:
            say(f"FLA decode failed: {type(exc).__name__}: {str(exc)[:200]}")
            t_f = float("nan")
        say(f"| {B} | {t_m:.4f} | {t_f:.4f} | {t_f / t_m:.2f}x | o {rel(o, ro):.1e}, state {rel(s, rs):.1e} |")


def main(argv=None) -> int:
    global LOG
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--budget", type=float, default=360.0, help="skip later sections after this many seconds")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--sweep-stages", default="intra,state,o", help="stages the sweep covers (default all three)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--config", default="", help="config (key=value,... or JSON) for the correctness and timing sections")
    p.add_argument("--shapes", nargs="*", default=None,
                   help="B,T,H triples (D = 128, bf16) for the correctness and timing sections; default: the "
                        "standard shapes (correctness also B1,T65536,H16)")
    p.add_argument("--sections", default="correctness,timing,decode,sweep,precision,tests",
                   help="comma-separated subset of: correctness,timing,decode,sweep,precision,tests")
    a = p.parse_args(argv)
    LOG = os.path.join(a.out, "triton_device.md")
    say(f"# Triton backend on {torch.cuda.get_device_name()}\n\n{versions()}\n")
    say("Command: `python bench/device_triton.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`")
    torch.manual_seed(0)
    extra = parse_config(a.config)
    want = set(a.sections.split(","))
    shapes = [parse_shape(s) for s in a.shapes] if a.shapes else None
    if "correctness" in want:
        correctness(shapes or STANDARD_SHAPES + [(1, 65536, 16)], ("log",), extra or None)
        correctness((shapes or STANDARD_SHAPES)[:1], ("safe",), extra or None)
    if "timing" in want:
        timing(shapes or STANDARD_SHAPES, ("log", "safe"), extra or None,
               "config " + str(extra) if extra else "default config")
    say(f"\n(at {elapsed():.0f}s)")
    if "decode" in want and elapsed() < a.budget:
        decode()
    if "sweep" in want and not a.skip_sweep and elapsed() < a.budget:
        best = sweep(STANDARD_SHAPES, a.budget, tuple(a.sweep_stages.split(",")))
        for shape, cfg in best.items():
            if elapsed() > a.budget:
                break
            timing([shape], ("log", "safe"), cfg, f"best swept {cfg}")
    if "precision" in want and elapsed() < a.budget:
        precision_check()
    if "tests" in want and not a.skip_tests and elapsed() < a.budget:
        say("\n## pytest tests/test_triton_gpu.py\n")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_triton_gpu.py"],
                           capture_output=True, text=True)
        say("```\n" + (r.stdout + r.stderr)[-3000:] + "\n```")
    say(f"\n(done at {elapsed():.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
