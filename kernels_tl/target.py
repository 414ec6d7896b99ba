"""Target aliases: the one place where a TileLang program learns whether it is built for a GPU or the CPU.

Every kernel in this package is written once, GPU-style (shared and fragment buffers, ``T.Parallel``,
``T.Pipelined``, ``T.gemm``).  TileLang's C target ("c", used by CI on machines without a GPU) cannot place
shared/fragment buffers or partition parallel loops over threads, so for it the same program is built with:

* shared and fragment allocations -> thread-local allocations (16-bit tiles held in float32),
* 16-bit global tensors -> float32 tensors (the host widens bf16/fp16 inputs, :func:`for_target`), while every
  value the GPU rounds to the 16-bit type (tile operands, intermediates stored to global memory) is rounded to
  it bit-exactly in float32 (:func:`round_float32_to`), so CPU builds see the GPU's 16-bit rounding,
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
import torch

CPU_TARGET = "c"
TL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
CUDA_ARCH = "sm_90a"


# mantissa bits float32 has beyond each 16-bit type (23 - 7 for bf16, 23 - 10 for fp16)
_DROPPED_BITS = {"bfloat16": 16, "float16": 13}


def round_float32_to(x, dtype: str):
    """float32 ``x`` rounded to the nearest ``dtype`` value (ties to even), as a float32; ``x`` itself for dtypes
    other than bf16/fp16.  Bit-level, so it works on the C target (which has no 16-bit types and folds casts).
    Exact for bf16 (NaN kept, infinities stay); for fp16 only the mantissa is rounded: fp16's range (overflow to
    inf, subnormals) is not emulated."""
    bits = _DROPPED_BITS.get(dtype)
    if bits is None:
        return x
    u = T.reinterpret(x, "uint32")
    half, low = T.uint32((1 << (bits - 1)) - 1), T.uint32((1 << bits) - 1)
    # add half an ulp less one, plus the lowest kept bit (so exact ties go to even), then drop the low bits
    rounded = (u + half + ((u >> T.uint32(bits)) & T.uint32(1))) & ~low
    return T.if_then_else(x != x, x, T.reinterpret(rounded, "float32"))


@dataclass(frozen=True)
class TargetOps:
    """Allocation and loop constructs for one target (see the module docstring)."""

    cpu: bool
    alloc_shared: Callable
    alloc_fragment: Callable
    Parallel: Callable

    def tile_dtype(self, dtype: str) -> str:
        """dtype of on-chip tiles meant to be ``dtype``: the C target keeps 16-bit tiles in float32 (its
        bf16/fp16 local buffers do not lower), the GPU keeps them as given (tensor-core operands)."""
        return "float32" if self.cpu else dtype

    def tensor_dtype(self, dtype: str) -> str:
        """dtype of a global tensor meant to be ``dtype``: float32 on the C target (the host widens 16-bit tensors
        there, :func:`for_target`), ``dtype`` on the GPU."""
        return "float32" if self.cpu else dtype

    def to_tile(self, x, dtype: str):
        """``x`` rounded to ``dtype``, for a tile of :meth:`tile_dtype` or a tensor of :meth:`tensor_dtype`: a cast
        on the GPU; on the CPU the value stays float32 but is rounded to ``dtype`` bit-exactly
        (:func:`round_float32_to`), so both targets compute the same numbers."""
        return round_float32_to(T.cast(x, "float32"), dtype) if self.cpu else T.cast(x, dtype)

    def stages(self, num_stages: int) -> int:
        """Pipeline depth usable on this target (0 on the CPU)."""
        return 0 if self.cpu else num_stages

    def colsum(self, src, dst):
        """``dst[j] = sum_c src[c, j]`` (``T.reduce_sum`` over dim 0 on the GPU, serial loops on the CPU)."""
        if self.cpu:
            _serial_colsum(src, dst)
        else:
            T.reduce_sum(src, dst, dim=0)

    def rowsum(self, src, dst):
        """``dst[r] = sum_c src[r, c]`` (``T.reduce_sum`` over dim 1 on the GPU, serial loops on the CPU)."""
        if self.cpu:
            _serial_rowsum(src, dst)
        else:
            T.reduce_sum(src, dst, dim=1)

    def Pipelined(self, extent, num_stages: int = 0):
        """``T.Pipelined`` on the GPU, a plain serial loop on the CPU."""
        if self.cpu or num_stages == 0:
            return T.serial(extent)
        return T.Pipelined(extent, num_stages=num_stages)


@T.macro
def _serial_colsum(src, dst):
    _serial_sum(src, dst, 1, 0)


@T.macro
def _serial_rowsum(src, dst):
    _serial_sum(src, dst, 0, 1)


@T.macro
def _serial_sum(src, dst, keep: int, reduce: int):
    """``dst[i] = sum_j src[i, j]`` along axis ``reduce`` of a 2-D ``src`` (axis ``keep`` indexes ``dst``)."""
    for i in T.serial(src.shape[keep]):
        dst[i] = 0.0
        for j in T.serial(src.shape[reduce]):
            dst[i] = dst[i] + src[(i, j) if keep == 0 else (j, i)]


_GPU_OPS = TargetOps(cpu=False, alloc_shared=T.alloc_shared, alloc_fragment=T.alloc_fragment, Parallel=T.Parallel)
_CPU_OPS = TargetOps(cpu=True, alloc_shared=T.alloc_local, alloc_fragment=T.alloc_local, Parallel=T.grid)


# The run-time sizes of the kernels (one build serves every shape): their names, here only.
RUNTIME_SIZES = {
    "H": "key heads", "HV": "value heads (a multiple of H)", "TT": "tokens of all sequences (flat token axis)",
    "TP": "rows of the row-padded intermediate buffers (TT + C: a chunk is read whole)",
    "TQ": "rows of the effective queries (TT when the sequence is split into segments, else 0)",
    "NC": "chunks of all sequences", "NH": "rows of the stored chunk states (NC when asked for, else 0)",
    "NS": "sequences", "NSEG": "segments of all sequences", "NG": "chunks with gate partial sums (NC, or 0)",
    "N0": "rows of an initial state or of its gradient (NS, or 0 when absent)",
    "N1": "rows of a final state or of its cotangent (NS, or 0 when absent)",
    "P0": "rows of a state pool (NS without a pool, 0 without an initial state)",
    "SC": "columns of the decode's slot table (draft tokens per sequence, speculative decoding)",
    "NA": "entries of num_accepted_tokens (NS, or 0 when absent)",
    "VA": "state columns of the fused kernel (V, or V + K with the segment scan)",
}


def runtime_sizes(names: str) -> tuple:
    """``T.dynamic`` sizes for the space-separated ``names`` (each one of :data:`RUNTIME_SIZES`)."""
    sizes = []
    for name in names.split():
        if name not in RUNTIME_SIZES:
            raise ValueError(f"unknown run-time size {name!r}; known: {sorted(RUNTIME_SIZES)}")
        sizes.append(T.dynamic(name))
    return tuple(sizes)


def is_cpu(target: str) -> bool:
    """True for TileLang's C target."""
    return str(target) == CPU_TARGET


def ops_for(target: str) -> TargetOps:
    """The aliases a kernel factory uses for ``target`` ("cuda", "c", ...)."""
    return _CPU_OPS if is_cpu(target) else _GPU_OPS


def for_target(x, target: str):
    """Tensor as the kernels for ``target`` take it: the C target has no 16-bit types, so bf16/fp16 tensors
    are widened to float32 on the host there (exactly; the kernels, built for the logical dtype, round what the GPU
    rounds: :meth:`TargetOps.to_tile`)."""
    if is_cpu(target) and x.dtype in (torch.bfloat16, torch.float16):
        return x.float()
    return x


@dataclass(frozen=True)
class FlatInputs:
    """A call's inputs as every TileLang kernel takes them: flat token axis, the target's dtypes, the gate's
    per-head parameters as float32 (zeros where absent), and the prologue's switches."""

    q: torch.Tensor        # [TT, H, K]
    k: torch.Tensor        # [TT, H, K]
    v: torch.Tensor        # [TT, HV, V]
    g: torch.Tensor        # [TT, HV, K]
    beta: torch.Tensor     # [TT, HV]
    a_log: torch.Tensor    # [HV] float32
    dt_bias: torch.Tensor  # [HV, K] float32
    prologue: object       # gate.Prologue


def flat_inputs(q, k, v, g, beta, A_log, dt_bias, opts, target: str) -> FlatInputs:
    """:class:`FlatInputs` of user-layout tensors (``q [B, T, H, K]``, ...) for ``target``."""
    from .gate import Prologue
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    TT = B * T
    prologue = Prologue.from_call(opts, A_log is not None, dt_bias is not None)
    f32 = dict(dtype=torch.float32, device=q.device)
    a_log = A_log.reshape(HV).to(**f32).contiguous() if prologue.has_A_log else torch.zeros(HV, **f32)
    bias = dt_bias.reshape(HV, K).to(**f32).contiguous() if prologue.has_dt_bias else torch.zeros(HV, K, **f32)
    qf, kf = (for_target(x.reshape(TT, H, K), target).contiguous() for x in (q, k))
    vf = for_target(v.reshape(TT, HV, V), target).contiguous()
    gf = for_target(g.reshape(TT, HV, K), target).contiguous()
    bf = for_target(beta.reshape(TT, HV), target).contiguous()
    gf = gf if gf.dtype in TL_DTYPES else gf.float()
    bf = bf if bf.dtype in TL_DTYPES else bf.float()
    return FlatInputs(qf, kf, vf, gf, bf, a_log, bias, prologue)


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
    """Compile lowered CUDA source to a cubin with the local nvcc, as TileLang does (nothing runs).  Raises
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
        code = arch.removeprefix("sm_")
        cmd = [nvcc, "-std=c++17", "-O3", "--cubin", "-gencode", f"arch=compute_{code},code=sm_{code}", src,
               "-o", os.path.join(tmp, "kernel.cubin"), "-w"] + [f"-I{p}" for p in includes]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed:\n{proc.stderr[-4000:]}")
