"""Shape buckets: the small, documented set of call classes the autotuner measures and the dispatch keys on.

A bucket is ``op / dtype / head dims / length class / layout``, for example
``chunk/bf16/K128V128/T8k/dense``.  Calls in one bucket share a winner: a kernel config that wins at the
bucket's representative shape is assumed to win for the whole class.

========  ==========================================================================================
field     values
========  ==========================================================================================
op        ``chunk`` (prefill/training, chunk_kda), ``recurrent`` (decode, fused_recurrent_kda)
dtype     ``bf16``, ``fp16``, ``fp32``, ``fp64``
dims      ``K{K}V{V}``
length    chunk: ``T1k`` (longest sequence <= 1024), ``T8k`` (<= 8192), ``Tlong`` (> 8192);
          recurrent: ``t1`` (one token per sequence), ``tfew`` (more: speculative decoding)
layout    ``dense`` (B sequences of equal length) or ``varlen`` (cu_seqlens)
========  ==========================================================================================
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
NAME_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
CHUNK_LENGTHS = (("T1k", 1024), ("T8k", 8192), ("Tlong", None))


@dataclass(frozen=True)
class Bucket:
    op: str
    dtype: str
    K: int
    V: int
    length: str
    layout: str

    @property
    def key(self) -> str:
        return f"{self.op}/{self.dtype}/K{self.K}V{self.V}/{self.length}/{self.layout}"

    @classmethod
    def parse(cls, key: str) -> "Bucket":
        """Inverse of :attr:`key`; raises ValueError naming the bad part."""
        try:
            op, dtype, dims, length, layout = key.split("/")
            K, V = dims[1:].split("V")
            bucket = cls(op, dtype, int(K), int(V), length, layout)
        except ValueError:
            raise ValueError(f"bucket key must look like 'chunk/bf16/K128V128/T8k/dense', got {key!r}") from None
        if op not in ("chunk", "recurrent") or dtype not in NAME_DTYPES or layout not in ("dense", "varlen"):
            raise ValueError(f"bucket key {key!r}: op must be chunk|recurrent, dtype one of {list(NAME_DTYPES)}, "
                             f"layout dense|varlen")
        return bucket


def length_class(op: str, longest: int) -> str:
    if op == "recurrent":
        return "t1" if longest <= 1 else "tfew"
    for name, limit in CHUNK_LENGTHS:
        if limit is None or longest <= limit:
            return name
    raise AssertionError("unreachable")


def bucket_of(call) -> Bucket:
    """The bucket of a :class:`kda_compile.dispatch.KDACall` (no device sync: varlen calls are classed by
    the packed length T, an upper bound of the longest sequence)."""
    p = call.problem
    longest = p.T  # dense: every sequence has T tokens; varlen: T bounds the longest
    return Bucket(call.op, DTYPE_NAMES.get(p.dtype, str(p.dtype)), p.K, p.V, length_class(call.op, longest),
                  "varlen" if p.varlen else "dense")


# ------------------------------------------------------------------------------- what the tuner measures

@dataclass(frozen=True)
class TuneShape:
    """A representative problem of a bucket: ``N`` sequences of ``T`` tokens, H key heads, HV value heads."""

    bucket: Bucket
    N: int
    T: int
    H: int
    HV: int


def default_tune_shapes(device: str, dtypes=("bf16",), dims=(128,), ops=("chunk", "recurrent")) -> list[TuneShape]:
    """The buckets tuned by default.  On CUDA these are the standard shapes of bench/RESULTS.md; on the
    CPU they are small (the CPU backends are for correctness checks, tuning there exercises the machinery)."""
    shapes = []
    gpu = device.startswith("cuda")
    for dtype in dtypes:
        for D in dims:
            if "chunk" in ops:
                if gpu:
                    shapes += [TuneShape(Bucket("chunk", dtype, D, D, "T1k", "dense"), 16, 1024, 16, 16),
                               TuneShape(Bucket("chunk", dtype, D, D, "T8k", "dense"), 2, 8192, 16, 16),
                               TuneShape(Bucket("chunk", dtype, D, D, "Tlong", "dense"), 1, 32768, 16, 16),
                               TuneShape(Bucket("chunk", dtype, D, D, "T8k", "varlen"), 4, 4096, 16, 16)]
                else:
                    shapes += [TuneShape(Bucket("chunk", dtype, D, D, "T1k", "dense"), 1, 100, 1, 1)]
            if "recurrent" in ops:
                if gpu:
                    shapes += [TuneShape(Bucket("recurrent", dtype, D, D, "t1", "dense"), 64, 1, 32, 32)]
                else:
                    shapes += [TuneShape(Bucket("recurrent", dtype, D, D, "t1", "dense"), 2, 1, 1, 1)]
    return shapes
