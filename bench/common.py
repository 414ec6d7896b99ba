"""Shared helpers of the benchmark scripts: input builders per provider, timing, tables.

Every number is a median of ``triton.testing.do_bench`` (or its CUDA-graph variant for launch-bound decode),
in milliseconds, measured in the same process as its peers.  A provider that fails to import or run is
reported as such in the table instead of stopping the run.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import traceback

import torch

STANDARD_SHAPES = [(2, 8192, 16), (1, 32768, 16), (8, 4096, 32)]
GATES = ("log", "safe")
LOWER_BOUND = -5.0


def make_inputs(B, T, H, D=128, gate="log", dtype=torch.bfloat16, device="cuda", seed=0):
    """bf16 q/k/v, float32 gate and beta; q/k normalised in the kernel (as in Kimi Linear)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s, dt=dtype: torch.randn(*s, generator=gen, device=device, dtype=torch.float32).to(dt)  # noqa: E731
    x = dict(q=r(B, T, H, D), k=r(B, T, H, D), v=r(B, T, H, D),
             beta=torch.rand(B, T, H, generator=gen, device=device, dtype=torch.float32))
    if gate == "log":
        x["g"] = torch.nn.functional.logsigmoid(r(B, T, H, D, dt=torch.float32) + 3.0)
    else:
        x["g"] = r(B, T, H, D, dt=torch.float32)
        x["A_log"] = torch.rand(H, generator=gen, device=device) * 0.5
        x["dt_bias"] = torch.randn(H * D, generator=gen, device=device) * 0.5
    return x


def kda_options(x, gate):
    """kda_compile's resolved options for bench inputs ``x`` (:func:`make_inputs`) and a gate mode: q/k L2 norm
    in the kernel, chunk size 64, the safe gate's lower bound unless ``gate == "log"``."""
    from kda_compile.api import _options
    return _options(x["q"], None, True, gate != "log", False, False, LOWER_BOUND if gate != "log" else None, 64,
                    False)


def triton_forward(x, gate, config: dict):
    """Our Triton forward straight through the backend, ``config`` merged over its defaults (no dispatch, no
    table): a zero-argument callable returning o."""
    from kda_compile.kernels_triton.chunk_fwd import chunk_kda_fwd
    opts = kda_options(x, gate)
    return lambda: chunk_kda_fwd(x["q"], x["k"], x["v"], x["g"], x["beta"], None, None, x.get("A_log"),
                                 x.get("dt_bias"), opts, False, config)[0]


def fla_forward(x, gate):
    """FLA's ``chunk_kda`` with the same flags as ours (q/k L2 norm in the kernel, the gate mode's keywords):
    a zero-argument callable returning o."""
    from fla.ops.kda import chunk_kda
    kw = dict(use_qk_l2norm_in_kernel=True, **gate_kwargs(gate))
    if gate != "log":
        kw.update(A_log=x["A_log"], dt_bias=x["dt_bias"])
    return lambda: chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw)[0]


def parse_shape(text: str) -> tuple[int, int, int]:
    """A ``B,T,H`` triple from the command line, e.g. ``8,4096,32``."""
    try:
        B, T, H = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"a shape is B,T,H (three integers), e.g. 8,4096,32; got {text!r}") from None
    if min(B, T, H) < 1:
        raise ValueError(f"B, T and H must be positive, got {text!r}")
    return B, T, H


def parse_config(text: str) -> dict:
    """A Triton backend config from the command line: JSON (``{"intra_impl": "split2"}``) or
    ``key=value,...`` (integers and ``None`` converted, everything else a string)."""
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


def gate_kwargs(gate: str) -> dict:
    """FLA/kda_compile keywords of a gate mode."""
    if gate == "log":
        return {}
    return dict(use_gate_in_kernel=True, safe_gate=True, lower_bound=LOWER_BOUND)


def time_ms(fn, graph: bool = False) -> float:
    """Median time of ``fn`` in ms (one warm-up call first, which also compiles)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, return_mode="median"))
    return float(triton.testing.do_bench(fn, return_mode="median"))


def try_time(name: str, fn, graph: bool = False, log=sys.stderr):
    """``time_ms`` or None (with the error printed) when the provider fails."""
    try:
        return time_ms(fn, graph)
    except Exception as exc:  # a peer that cannot run is a table entry, not a crash
        print(f"[{name}] failed: {type(exc).__name__}: {str(exc)[:300]}", file=log)
        traceback.print_exc(limit=2, file=log)
        return None


def fmt(x, digits=3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def ratio(a, b) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def versions() -> str:
    """GPU and library versions, one line."""
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for mod in ("triton", "tilelang", "fla", "cudnn"):
        try:
            m = __import__(mod)
            parts.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception:
            parts.append(f"{mod} (not importable)")
    if torch.cuda.is_available():
        parts.insert(0, f"GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    return ", ".join(parts)


def fast_backends() -> list[str]:
    """Every registered kda_compile backend except the reference."""
    import kda_compile

    return [b for b in kda_compile.backends() if b != "reference"]


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", help="append the table (markdown) to this file")
    p.add_argument("--quick", action="store_true", help="first shape and log gate only")
    return p


def emit(text: str, out: str | None) -> None:
    print(text, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")


def dense_cu_seqlens(B: int, T: int, device="cuda") -> torch.Tensor:
    return torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=device)


def isfinite_number(x) -> bool:
    return x is not None and math.isfinite(x)
