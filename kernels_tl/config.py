"""Kernel configs of the TileLang backend: one typed dataclass per op, defaults in one place.

A config travels as a plain dict (tuned tables are JSON); :func:`chunk_config` / :func:`decode_config` turn it
into the dataclass and reject unknown keys and bad values before anything compiles.  The knobs are those the
autotune space varies; fixed choices are constants beside the kernels (docs/tilelang.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DECODE_LAYOUTS = ("column", "tile")


@dataclass(frozen=True)
class ChunkConfig:
    """Config of the chunkwise forward (H100 defaults at B2·T8192·H16: 256 threads for the intra kernel, 32
    state columns per program of the state/output kernel)."""

    intra_threads: int = 256
    diag_gemm: bool = True        # diagonal blocks of A on tensor cores when their decay spread allows
    state_BV: int = 32
    state_stages: int = 1

    def __post_init__(self):
        _one_of("intra_threads", self.intra_threads, (128, 256))
        _one_of("diag_gemm", self.diag_gemm, (True, False))
        _one_of("state_BV", self.state_BV, (16, 32, 64, 128))
        _one_of("state_stages", self.state_stages, (1, 2))


@dataclass(frozen=True)
class DecodeConfig:
    """Config of the decode kernel: ``layout`` "column" (one thread per state column) or "tile" (a reduction
    over a [K, decode_BV] tile with ``decode_threads`` threads)."""

    layout: str = "column"
    decode_BV: int = 128
    decode_threads: int = 128

    def __post_init__(self):
        _one_of("layout", self.layout, DECODE_LAYOUTS)
        _one_of("decode_BV", self.decode_BV, (16, 32, 64, 128))
        if self.layout == "column" and self.decode_threads != self.decode_BV:
            raise ValueError("TileLang decode_threads must equal decode_BV with layout='column' (a thread per "
                             f"column), got {self.decode_threads} and {self.decode_BV}")


@dataclass(frozen=True)
class BackwardConfig:
    """Config of the chunkwise backward (kernels_tl/chunk_bwd.py).  ``intra_threads`` and ``diag_gemm`` are the
    forward's intra kernel, run again to recompute its intermediates; ``states_BV`` the value block of the state
    recompute; the ``bwd_*`` keys the backward stages' blocks and thread counts (clipped to K, V)."""

    intra_threads: int = 256
    diag_gemm: bool = False       # exact diagonal tiles: the recomputed forward is causal bit for bit
    states_BV: int = 32
    bwd_state_BV: int = 32
    bwd_solve_BV: int = 32
    bwd_solve_threads: int = 256
    bwd_intra_BK: int = 64
    bwd_intra_BV: int = 32
    bwd_intra_threads: int = 256
    bwd_prologue_BT: int = 32

    def __post_init__(self):
        _one_of("intra_threads", self.intra_threads, (128, 256))
        _one_of("diag_gemm", self.diag_gemm, (True, False))
        for name in ("states_BV", "bwd_state_BV", "bwd_solve_BV", "bwd_intra_BK", "bwd_intra_BV"):
            _one_of(name, getattr(self, name), (16, 32, 64, 128))
        for name in ("bwd_solve_threads", "bwd_intra_threads"):
            _one_of(name, getattr(self, name), (128, 256))
        _one_of("bwd_prologue_BT", self.bwd_prologue_BT, (16, 32, 64))


def backward_config(config: dict | None = None) -> BackwardConfig:
    """The :class:`BackwardConfig` of ``config`` (missing fields at their defaults)."""
    return _from_dict(BackwardConfig, config or {})


def chunk_config(config: dict | None = None) -> ChunkConfig:
    """The :class:`ChunkConfig` of ``config`` (missing fields at their defaults)."""
    return _from_dict(ChunkConfig, config or {})


def decode_config(config: dict | None = None) -> DecodeConfig:
    """The :class:`DecodeConfig` of ``config`` (missing fields at their defaults)."""
    return _from_dict(DecodeConfig, config or {})


def _from_dict(cls, values: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown TileLang {cls.__name__} key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**values)


def _one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"TileLang config {name} must be one of {allowed}, got {value!r}")
