"""Registers, spill stack and shared memory of the fused Triton forward (kernels_triton/chunk_fused.py) on sm_90,
from Triton's own compiler and the ptxas/cuobjdump it ships: no GPU needed.

    python bench/triton_fused_resources.py --bv 64 32 --warps 4 8 [--slice 16 32] [--solve-diag subst] [--check]

bf16 inputs, K = V = 128, C = 64, safe gate with the q/k L2 norm and beta sigmoid (the standard shapes' flags).
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)   # compile for the GPU target, not the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kda_compile.kernels_triton.chunk_fused import K_SLICE, kda_fused_kernel  # noqa: E402

POINTERS = {"q": "*bf16", "k": "*bf16", "v": "*bf16", "g": "*fp32", "beta": "*fp32", "A_log": "*fp32",
            "dt_bias": "*fp32", "h0": "*fp32", "o": "*bf16", "ht": "*fp32", "cu": "*i32", "seq_first": "*i32",
            "s_k": "i32", "s_v": "i32", "scale": "fp32", "shift": "fp32", "lower_bound": "fp32"}


def resources(K: int, V: int, C: int, BV: int, warps: int, KS: int = K_SLICE, solve_diag: str = "tf32",
              check: bool = False, capability: int = 90) -> dict:
    """``{"regs", "stack", "shared"}`` of ``kda_fused_kernel`` compiled for ``sm_{capability}`` with K slices of
    ``KS`` channels (``check``: the range check of a gate without a safe lower bound)."""
    const = dict(H=16, HV=16, K=K, V=V, C=C, KS=KS, USE_GATE=True, USE_LB=True, HAS_A=True, HAS_BIAS=True,
                 L2NORM=True, BETA_SIGMOID=True, BETA_SCALE=1.0, CHECK=check, HAS_H0=True,
                 INTERPRET=False, BV=BV, DOT_PREC="tf32", PREC="tf32", SOLVE_PREC="tf32", SOLVE_DIAG=solve_diag)
    sig = {**POINTERS, **{name: "constexpr" for name in const}}
    src = ASTSource(fn=kda_fused_kernel, signature=sig,
                    constexprs={(list(sig).index(name),): value for name, value in const.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    regs, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    return {"regs": regs, "stack": stack, "shared": kernel.metadata.shared}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bv", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--slice", type=int, nargs="+", default=[K_SLICE], help="K slice widths (KS)")
    parser.add_argument("--solve-diag", default="tf32", help="the inverse's diagonal blocks: tf32, ieee or subst")
    parser.add_argument("--check", action="store_true", help="a gate without a safe lower bound (range check)")
    args = parser.parse_args()
    for ks, bv, warps in itertools.product(args.slice, args.bv, args.warps):
        r = resources(args.dim, args.dim, args.chunk, bv, warps, ks, args.solve_diag, args.check)
        print(f"K=V={args.dim} C={args.chunk} KS={ks} BV={bv} warps={warps} solve_diag={args.solve_diag}"
              f"{' check' if args.check else ''}: {r['regs']} registers, "
              f"{r['stack']} B stack per thread, {r['shared']} B shared", flush=True)


if __name__ == "__main__":
    main()
