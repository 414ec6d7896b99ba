"""Target aliases: the one place where a TileLang program learns whether it is built for a GPU or the CPU.

Every kernel in this package is written once, GPU-style (shared and fragment buffers, ``T.Parallel``,
``T.Pipelined``, ``T.gemm``).  TileLang's C target ("c", used by CI on machines without a GPU) cannot place
shared/fragment buffers or partition parallel loops over threads, so for it the same program is built with:

* shared and fragment allocations -> thread-local allocations,
* ``T.Parallel(a, b, ...)`` -> ``T.grid(a, b, ...)`` (serial loops),
* software-pipeline depth -> 0 (``T.Pipelined`` becomes a plain loop).

:func:`ops_for` returns these aliases for a target; :func:`compile_kernel` builds a ``@T.prim_func`` for a
target and caches it per process; :func:`cuda_source` lowers a program for CUDA (sm_90a by default) without
a GPU, so CI proves the CUDA version still compiles.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Callable

import tilelang
import tilelang.language as T

CPU_TARGET = "c"
CUDA_ARCH = "sm_90a"


@dataclass(frozen=True)
class TargetOps:
    """Allocation and loop constructs for one target (see the module docstring)."""

    cpu: bool
    alloc_shared: Callable
    alloc_fragment: Callable
    Parallel: Callable

    def stages(self, num_stages: int) -> int:
        """Pipeline depth usable on this target (0 on the CPU)."""
        return 0 if self.cpu else num_stages

    def Pipelined(self, extent, num_stages: int = 0):
        """``T.Pipelined`` on the GPU, a plain serial loop on the CPU."""
        if self.cpu or num_stages == 0:
            return T.serial(extent)
        return T.Pipelined(extent, num_stages=num_stages)


_GPU_OPS = TargetOps(cpu=False, alloc_shared=T.alloc_shared, alloc_fragment=T.alloc_fragment, Parallel=T.Parallel)
_CPU_OPS = TargetOps(cpu=True, alloc_shared=T.alloc_local, alloc_fragment=T.alloc_local, Parallel=T.grid)


def is_cpu(target: str) -> bool:
    """True for TileLang's C target."""
    return str(target) == CPU_TARGET


def ops_for(target: str) -> TargetOps:
    """The aliases a kernel factory uses for ``target`` ("cuda", "c", ...)."""
    return _CPU_OPS if is_cpu(target) else _GPU_OPS


def target_for(device) -> str:
    """TileLang target for tensors on ``device``."""
    return "cuda" if getattr(device, "type", str(device)) == "cuda" else CPU_TARGET


@functools.lru_cache(maxsize=None)
def _compiled(factory: Callable, target: str, key: tuple):
    program = factory(*key[0], target=target, **dict(key[1]))
    return tilelang.compile(program, target=target, out_idx=None)


def compile_kernel(factory: Callable, target: str, *args, **kwargs):
    """Build ``factory(*args, target=target, **kwargs)`` for ``target``; cached in memory per process
    (TileLang's own disk cache also applies to GPU builds)."""
    return _compiled(factory, target, (tuple(args), tuple(sorted(kwargs.items()))))


def cuda_source(program, arch: str = CUDA_ARCH) -> str:
    """Lower a GPU-style program to CUDA C++ for ``arch`` without a GPU; returns the kernel source."""
    from tvm.target import Target

    target = Target({"kind": "cuda", "arch": arch})
    with target:
        artifact = tilelang.lower(program, target=target)
    return artifact.kernel_source


def nvcc_compile(source: str, arch: str = CUDA_ARCH) -> None:
    """Compile lowered CUDA source with the local nvcc (object file only; nothing runs).  Raises
    RuntimeError with nvcc's message when it fails, FileNotFoundError when nvcc is missing."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH")
    root = os.path.dirname(tilelang.__file__)
    includes = [os.path.join(root, "src"), os.path.join(root, "3rdparty", "cutlass", "include")]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.cu")
        with open(src, "w") as f:
            f.write(source)
        cmd = [nvcc, "-std=c++17", f"-arch={arch}", "-c", src, "-o", os.path.join(tmp, "kernel.o"), "-w",
               "-DENABLE_BF16", "-DENABLE_FP8"] + [f"-I{p}" for p in includes]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed:\n{proc.stderr[-4000:]}")
