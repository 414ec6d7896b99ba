"""Compile this package's Triton kernels for a GPU target on a machine without a GPU.

Triton's CPU interpreter runs our kernels in the tests, but it is not Triton's compiler: it never checks, for
example, that a loop-carried variable keeps its type across iterations, so a kernel can pass every CPU test and
then fail to compile on the first GPU.  This module closes that gap in two steps, each in its own process:

1. :func:`record` runs a few API calls (forward, training, decode; bf16, K = V = 128) under the interpreter and
   records every launch of one of our kernels: which kernel, its argument types, its ``constexpr`` values and its
   launch options.
2. :func:`compile_launch` builds one recorded launch with Triton's own compiler for ``sm_90`` (Triton ships
   ``ptxas``; no driver is needed) and returns its register, spill and shared-memory use.

``python tests/triton_launches.py`` prints that table, one line per distinct launch (``--help``).
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "kda_compile."
TENSOR_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int32": "i32",
                "int64": "i64", "int8": "i8", "uint8": "u8", "bool": "i1"}
# the calls whose launches are recorded (keywords of _run_call): a forward, four training steps, a decode step
CALLS = [
    dict(setting="prenorm_log", train=False),
    dict(setting="prenorm_log", train=True),
    dict(setting="l2_log", train=True),
    dict(setting="l2_safe", train=True),
    dict(setting="l2_safe", train=True, chunk_size=32),
    dict(setting="l2_log", decode=True),
]


def _arg_type(value) -> str:
    """Triton's signature type of a non-constexpr kernel argument."""
    import torch
    if isinstance(value, torch.Tensor):
        return "*" + TENSOR_TYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a {type(value).__name__} argument")


def _launch_record(fn, args, kwargs) -> dict:
    """The JSON-able description of one launch of the Python function ``fn`` (the interpreter's kernel)."""
    sig = inspect.signature(fn)
    params = sig.parameters
    bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in params})
    bound.apply_defaults()
    signature, constexprs = {}, {}
    for name, param in params.items():
        value = bound.arguments.get(name)
        if "constexpr" in str(param.annotation) or value is None:
            signature[name] = "constexpr"
            constexprs[name] = False if name == "INTERPRET" else value
        else:
            signature[name] = _arg_type(value)
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": options}


def _inputs(setting: str, train: bool, T: int = 80):
    """The prebuild's inputs of a setting (bf16, K = V = 128) at B1·H1 on the CPU, T not a multiple of the chunk,
    with an initial state."""
    import torch

    from kda_compile.prebuild import _inputs as prebuild_inputs
    x, kw = prebuild_inputs(setting, 1, T, 1, train, device="cpu")
    x["initial_state"] = torch.randn(1, 1, 128, 128, requires_grad=train)
    return x, kw


def _run_call(setting: str, train: bool = False, decode: bool = False, chunk_size: int | None = None) -> None:
    import torch

    import kda_compile
    if decode:
        x, kw = _inputs(setting, False, T=1)
        pool = torch.zeros(3, 1, 128, 128)
        x["initial_state"] = pool
        with torch.inference_mode():
            kda_compile.fused_recurrent_kda(**x, **kw, ssm_state_indices=torch.tensor([2], dtype=torch.int32),
                                            inplace_final_state=True, backend="triton")
        return
    x, kw = _inputs(setting, train)
    if chunk_size is not None:
        kw["chunk_size"] = chunk_size
    if train:
        o, ht = kda_compile.chunk_kda(**x, **kw, output_final_state=True, backend="triton")
        (o.float().square().mean() + ht.square().mean()).backward()
    else:
        with torch.inference_mode():
            kda_compile.chunk_kda(**x, **kw, output_final_state=True, backend="triton")


def _record_worker() -> None:
    """In the interpreter process: run :data:`CALLS`, print the distinct launches as JSON lines."""
    from triton.runtime.interpreter import InterpretedFunction
    seen: dict[str, None] = {}
    original = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if self.fn.__module__.startswith(PACKAGE):
            seen[json.dumps(_launch_record(self.fn, args, kwargs), sort_keys=True)] = None
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)
    InterpretedFunction.run = recording_run
    for call in CALLS:
        _run_call(**call)
    for line in seen:
        print(line)


def record(timeout: float = 900) -> list[dict]:
    """The distinct launches of our kernels in :data:`CALLS`, recorded under Triton's interpreter in a child
    process (the kernels must be defined with ``TRITON_INTERPRET=1`` set)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    code = "import sys; sys.path.insert(0, 'tests'); import triton_launches; triton_launches._record_worker()"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"recording the launches failed:\n{out.stderr[-4000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _compile(launch: dict, capability: int):
    """Triton's compiled kernel of one recorded launch for ``sm_{capability}``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compiling needs TRITON_INTERPRET unset (the kernels were defined for the interpreter)")
    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    src = ASTSource(fn=fn, signature=launch["signature"], constexprs=launch["constexprs"])
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=launch["options"])


def compile_launch(launch: dict, capability: int = 90) -> dict:
    """Compile one recorded launch for ``sm_{capability}`` with Triton's compiler; returns ``{"regs", "stack",
    "shared"}`` (registers per thread, stack bytes per thread (spills included), shared bytes per program).  Call it
    in a process where ``TRITON_INTERPRET`` is unset (the kernels must be JIT functions)."""
    kernel = _compile(launch, capability)
    return {**_cubin_usage(kernel), "shared": kernel.metadata.shared}


def instructions_by_line(kernel, module: str) -> tuple[int, dict]:
    """``(total, {(file, line): count})``: the static SASS instructions of a compiled kernel (per warp) attributed to
    the source line of its module ``module`` (a file name) that they come from (through the inlining line info of
    ``nvdisasm -gi``, so a helper's or the standard library's instructions count at the line that calls it)."""
    import collections
    sass = _cubin_tool(kernel, "nvdisasm", "-gi", "-c")
    counts, where, total = collections.Counter(), None, 0
    for line in sass.splitlines():
        locations = re.findall(r'File "([^"]+)", line (\d+)', line)
        if locations:
            mine = [(Path(name).name, int(number)) for name, number in locations if Path(name).name == module]
            where = mine[-1] if mine else (Path(locations[-1][0]).name, int(locations[-1][1]))
        elif re.match(r"\s+/\*[0-9a-f]+\*/\s+\S", line):
            counts[where] += 1
            total += 1
    return total, dict(counts)


def _cubin_tool(kernel, tool: str, *args: str) -> str:
    """The output of one of the NVIDIA tools that ship with Triton (``cuobjdump``, ``nvdisasm``) run on the
    compiled kernel's cubin."""
    import tempfile

    import triton
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
        return subprocess.run([str(path), *args, f.name], capture_output=True, text=True, check=True).stdout


def _cubin_usage(kernel) -> dict:
    """Registers and stack bytes per thread from the cubin."""
    usage = _cubin_tool(kernel, "cuobjdump", "--dump-resource-usage")
    return {key: int(re.search(rf"{tag}:(\d+)", usage).group(1)) for key, tag in (("regs", "REG"), ("stack", "STACK"))}


def describe(launch: dict) -> str:
    """A short name of a launch: kernel, the constexprs that pick its code path, and its warps."""
    shown = {k: v for k, v in launch["constexprs"].items() if k in ("C", "BK", "BV", "L2NORM", "USE_GATE", "USE_LB")}
    return f"{launch['kernel']} {shown} {launch['options']}"


def print_instructions(kernel: str, capability: int, min_count: int) -> int:
    """Print :func:`instructions_by_line` for every recorded launch of ``kernel``."""
    launches = [launch for launch in record() if launch["kernel"] == kernel]
    if not launches:
        print(f"no recorded launch of {kernel}")
        return 1
    for launch in launches:
        kernel = _compile(launch, capability)
        total, counts = instructions_by_line(kernel, Path(importlib.import_module(launch["module"]).__file__).name)
        print(f"{describe(launch)}: {total} instructions, {_cubin_usage(kernel)}", flush=True)
        for where, count in sorted(counts.items(), key=lambda item: item[0] or ("", 0)):
            if count >= min_count:
                print(f"  {'%s:%d' % where if where else '(no line)'} {count}")
    return 0


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Compile every Triton kernel launch of a few interpreter calls for a "
                                "GPU target, without a GPU, and print each one's registers, stack and shared memory.")
    p.add_argument("--capability", type=int, default=90, help="the target's compute capability (default 90)")
    p.add_argument("--json", action="store_true", help="one JSON object per launch (for the tests)")
    p.add_argument("--sass", metavar="KERNEL", help="instead: the static SASS instruction count of KERNEL's launches "
                   "(e.g. kda_bwd_intra_kernel) per source line of its module, lines with at least --min-count")
    p.add_argument("--min-count", type=int, default=20, help="with --sass: the smallest count shown (default 20)")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    if args.sass:
        return print_instructions(args.sass, args.capability, args.min_count)
    failed = 0
    for launch in record():
        try:
            result = {"ok": True, **compile_launch(launch, args.capability)}
        except Exception as exc:   # a compile error is the finding: report it with the launch
            failed += 1
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if args.json:
            print(json.dumps({"launch": describe(launch), **result}), flush=True)
        elif result["ok"]:
            print(f"{describe(launch)}: {result['regs']} registers, {result['stack']} B stack, "
                  f"{result['shared']} B shared", flush=True)
        else:
            print(f"{describe(launch)}: FAILED {result['error']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
