"""Shared runner of the benchmark scripts: inputs, providers' skip handling, timing, sweeps and tables.

Each ``bench_<op>.py`` script only builds one callable per provider; this module times it and writes the
results. Sweeps go through ``triton.testing.perf_report`` (a printed table, a CSV and a PNG plot per sweep);
every table is also printed as markdown headed by the GPU, library versions, date and the exact command.
A provider that does not import or cannot run the call is skipped with its reason printed, never a crash.

Timing: on CUDA the median of ``triton.testing.do_bench`` (``do_bench_cudagraph`` for launch-bound decode);
on the CPU (to check the scripts at tiny sizes) the median wall time of a few calls.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import signal
import statistics
import sys
import time

import torch

STANDARD_SHAPES = [(2, 8192, 16), (1, 32768, 16), (8, 4096, 32)]  # (B, T, H), D = 128, bf16
TINY_SHAPES = [(1, 64, 2), (2, 32, 2)]                              # CPU check of the scripts
GATES = ("log", "safe")
LOWER_BOUND = -5.0  # the safe gate's lower bound


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


# ------------------------------------------------------------------------------------------ arguments

def parse_shape(text: str) -> tuple[int, int, int]:
    """A ``B,T,H`` triple from the command line, e.g. ``8,4096,32``."""
    try:
        B, T, H = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"a shape is B,T,H (three integers), e.g. 8,4096,32; got {text!r}") from None
    if min(B, T, H) < 1:
        raise ValueError(f"B, T and H must be positive, got {text!r}")
    return B, T, H


def parse_ints(text: str, name: str) -> list[int]:
    """A comma-separated list of positive integers (``--sweep-T 1024,2048``)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} is a comma-separated list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} needs at least one positive integer, got {text!r}")
    return values


def parse_config(text: str) -> dict:
    """A kernel config from the command line: JSON (``{"o_BK": 64}``) or ``key=value,...`` (integers and
    ``None`` converted, everything else a string). The backend's own config type checks the keys."""
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    config = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config item {item!r} is not key=value")
        config[key.strip()] = None if value == "None" else int(value) if value.lstrip("-").isdigit() else value
    return config


def pick_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device must be auto, cuda or cpu, got {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible (use --device cpu for the tiny CPU check)")
    return name


def parser(description: str) -> argparse.ArgumentParser:
    """The options every script shares."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (default: cuda when available), cuda or cpu; on the "
                   "CPU every size shrinks to a tiny check of the script")
    p.add_argument("--out", default=None, help="also append the markdown tables to this file")
    return p


# --------------------------------------------------------------------------------------------- inputs

def make_inputs(B, T, H, D=128, gate="log", dtype=torch.bfloat16, device="cuda", seed=0) -> dict:
    """q/k/v in ``dtype``, float32 gate and beta in [0, 1). Log gate: ``g = logsigmoid(randn + 3)``; safe gate:
    a raw gate with ``A_log`` and ``dt_bias`` for the kernel's prologue."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dt)

    x = dict(q=rand(B, T, H, D), k=rand(B, T, H, D), v=rand(B, T, H, D),
             beta=torch.rand(B, T, H, generator=gen, device=device, dtype=torch.float32))
    if gate == "log":
        x["g"] = torch.nn.functional.logsigmoid(rand(B, T, H, D, dt=torch.float32) + 3.0)
    elif gate == "safe":
        x["g"] = rand(B, T, H, D, dt=torch.float32)
        x["A_log"] = torch.rand(H, generator=gen, device=device) * 0.5
        x["dt_bias"] = torch.randn(H * D, generator=gen, device=device) * 0.5
    else:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    return x


def gate_kwargs(gate: str) -> dict:
    """The keywords of a gate mode, the same for FLA and kda_compile (q/k L2 norm in the kernel)."""
    kw = dict(use_qk_l2norm_in_kernel=True)
    if gate != "log":
        kw.update(use_gate_in_kernel=True, safe_gate=True, lower_bound=LOWER_BOUND)
    return kw


def dense_cu_seqlens(B: int, T: int, device) -> torch.Tensor:
    """``cu_seqlens`` of B sequences of T tokens packed together (cuDNN-frontend's input layout)."""
    return torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------------------------- ours

def our_backends(device: str, wanted: str | None = None) -> list[str]:
    """kda_compile backends to time: ``wanted`` (comma list) or every registered one; on CUDA the float64-
    accurate ``reference`` only when named, since it is orders of magnitude slower."""
    import kda_compile

    registered = kda_compile.backends()
    if wanted:
        names = [n.strip() for n in wanted.split(",") if n.strip()]
        for n in names:
            if n not in registered:
                print(f"[skip] ours:{n}: not registered here (registered: {registered}; "
                      f"`python -m kda_compile info` says why)", file=sys.stderr)
        return [n for n in names if n in registered]
    return [n for n in registered if device == "cpu" or n != "reference"]


def add_provider_options(p: argparse.ArgumentParser, peers: tuple) -> None:
    """``--providers`` (ours and the ``peers``) and ``--backends`` (which of ours), shared by the scripts."""
    p.add_argument("--providers", default="ours," + ",".join(peers),
                   help=f"ours, {', '.join(peers)} (default all)")
    p.add_argument("--backends", default=None, help="our backends (default: every registered one but the "
                   "reference on CUDA)")


def providers_for(args, device: str, peers: tuple) -> list[str]:
    """The providers to time: ``ours:<backend>`` for each of our backends, then the peers asked for; an unknown
    name in ``--providers`` is a ValueError."""
    wanted = [w.strip() for w in args.providers.split(",") if w.strip()]
    unknown = set(wanted) - {"ours", *peers}
    if unknown:
        raise ValueError(f"--providers takes ours, {', '.join(peers)}; got {sorted(unknown)}")
    names = [f"ours:{b}" for b in our_backends(device, args.backends)] if "ours" in wanted else []
    return names + [w for w in peers if w in wanted]


def backend_call(op: str, x: dict, name: str, **kwargs):
    """Our kernels straight through one backend with an explicit config: a zero-argument callable.
    ``kwargs`` are the public API's keywords; ``config`` (a dict) goes to the backend as the tuned table would."""
    from kda_compile import dispatch
    from kda_compile.api import _check

    config = kwargs.pop("config")
    state = kwargs.pop("initial_state", None)
    final = kwargs.pop("output_final_state", False)
    problem, opts = _check(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=state, A_log=x.get("A_log"),
                           dt_bias=x.get("dt_bias"), **kwargs)
    call = dispatch.KDACall(op, problem, opts, x["q"], x["k"], x["v"], x["g"], x["beta"], state, None,
                            x.get("A_log"), x.get("dt_bias"), output_final_state=final)
    backend = dispatch.get_backend(name)
    why_not = (backend.supports_forced or backend.supports)(call)
    if why_not:
        raise Skip(why_not)
    return lambda: backend.run(call, config)


def check_runs(name: str, op: str, x: dict, **kwargs) -> None:
    """Raise :class:`Skip` with the dispatch's reason when backend ``name`` cannot run this call."""
    import kda_compile

    try:
        kda_compile.explain(x["q"], x["k"], x["v"], x["g"], x["beta"], op=op, backend=name,
                            A_log=x.get("A_log"), dt_bias=x.get("dt_bias"), **kwargs)
    except ValueError as exc:
        raise Skip(str(exc)) from None


# -------------------------------------------------------------------------------------------- timing

_SKIPPED: set[str] = set()


def time_ms(fn, device: str, graph: bool = False, reps: int = 5) -> float:
    """Median time of ``fn`` in ms. One warm-up call first (it compiles)."""
    fn()
    if device == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        if graph:
            return float(triton.testing.do_bench_cudagraph(fn, return_mode="median"))
        return float(triton.testing.do_bench(fn, return_mode="median"))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(provider: str, build, device: str, graph: bool = False) -> float:
    """Time the callable ``build()`` returns; NaN (and the reason printed once) when the provider does not
    import, cannot run the call, or fails."""
    try:
        return time_ms(build(), device, graph)
    except (ImportError, Skip) as exc:
        if provider not in _SKIPPED:
            _SKIPPED.add(provider)
            print(f"[skip] {provider}: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr, flush=True)
    except Exception as exc:  # a peer that fails is an empty cell, not a crash
        print(f"[fail] {provider}: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr, flush=True)
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return float("nan")


# --------------------------------------------------------------------------------------------- output

def versions(device: str) -> str:
    """Device and library versions, one line."""
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for mod in ("triton", "tilelang", "fla", "cudnn"):
        try:
            parts.append(f"{mod} {getattr(__import__(mod), '__version__', '?')}")
        except Exception:
            parts.append(f"{mod} (not importable)")
    if device == "cuda":
        parts.insert(0, f"GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        parts.insert(0, f"CPU {platform.machine()}, {os.cpu_count()} cores")
    return ", ".join(parts)


def header(title: str, device: str) -> str:
    """Markdown heading with the device, versions, date and the exact command."""
    command = shlex.join(["python", *sys.argv])
    return f"### {title}\n\n{versions(device)}; {datetime.date.today().isoformat()}\n\n`{command}`\n"


def fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def with_ratios(headers: list[str], rows: list[list], providers: list[str], ylabel: str, peer: str = "fla"):
    """Add ``<ours> / <peer>`` columns (time over the peer's time: below 1 is faster) for every ``ours:*``."""
    if peer not in providers:
        return headers, rows
    col = {p: headers.index(f"{p} ({ylabel})") for p in providers}
    ours = [p for p in providers if p.startswith("ours:")]
    headers = headers + [f"{p[5:]} / {peer}" for p in ours]
    rows = [row + [row[col[p]] / row[col[peer]] if row[col[peer]] else float("nan") for p in ours] for row in rows]
    return headers, rows


@contextlib.contextmanager
def stopped_by_sigterm():
    """Within the block, SIGTERM (what ``timeout`` sends) raises ``SystemExit(143)`` in the main thread, so the
    ``finally`` clauses of a bench run and it can write the rows it has measured before it stops."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def emit(text: str, out: str | None) -> None:
    print(text, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")


def run_sweep(fn, *, x_names, x_vals, providers, ylabel, plot_name, args, save_path, title, device, out,
              x_log=False, y_log=False):
    """``fn(**x, provider=..., **args) -> time`` over the grid through ``triton.testing.perf_report``, which
    prints the table and writes ``<plot_name>.csv`` and ``.png`` to ``save_path`` (no plot when ``plot_name``
    is None); then the markdown table. Without pandas/matplotlib (perf_report needs both) the same grid is
    measured and only the markdown table is written, with the reason printed."""
    import triton.testing

    names = [f"{p} ({ylabel})" for p in providers]
    bench = triton.testing.Benchmark(x_names=list(x_names), x_vals=list(x_vals), line_arg="provider",
                                     line_vals=list(providers), line_names=list(providers), ylabel=ylabel,
                                     plot_name=plot_name or "", args=dict(args), xlabel=x_names[0],
                                     x_log=x_log, y_log=y_log)
    try:
        import matplotlib
        import pandas  # noqa: F401  (perf_report imports it)

        matplotlib.use("Agg")
    except ImportError as exc:
        print(f"[no plot] triton.testing.perf_report needs pandas and matplotlib: {exc}", file=sys.stderr)
        rows = []
        for x in x_vals:
            point = dict(zip(x_names, x if isinstance(x, (list, tuple)) else [x] * len(x_names)))
            rows.append([*point.values(), *(fn(**point, provider=p, **args) for p in providers)])
    else:
        if save_path and plot_name:
            os.makedirs(save_path, exist_ok=True)
        df = triton.testing.perf_report(bench)(fn).run(print_data=True, return_df=True, show_plots=False,
                                                       save_path=save_path if plot_name else "")
        rows = df[list(x_names) + names].values.tolist()
        rows = [[int(v) if isinstance(v, float) and v.is_integer() else v for v in row[:len(x_names)]]
                + row[len(x_names):] for row in rows]
        if save_path and plot_name:
            print(f"plot: {os.path.join(save_path, plot_name + '.png')}", file=sys.stderr)
    headers, rows = with_ratios([*x_names, *names], rows, list(providers), ylabel)
    emit(f"\n{header(title, device)}\n{markdown_table(headers, rows)}\n", out)
    return headers, rows
