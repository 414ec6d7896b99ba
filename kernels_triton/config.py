"""Kernel configs of the Triton backend: one typed dataclass per op, defaults in one place.

A config travels as a plain dict (tuned tables are JSON); :func:`chunk_config` / :func:`decode_config` turn it
into the dataclass and reject unknown keys and bad values before any launch.  The knobs are those the autotune
space varies; the other launch parameters are constants beside the kernels that use them, each with the
measurement that chose it (docs/triton.md).

Precision of the float32 products (A, W/U, and the state/output products for float32 inputs):
``precision`` ("tf32", "tf32x3" or "ieee") and the inverse's ``solve_precision`` / ``solve_diag``.  bf16/fp16
inputs default to TF32 for the float32 intermediates; float32 inputs follow PyTorch's
``torch.set_float32_matmul_precision`` or ``torch.backends.cuda.matmul.fp32_precision`` ("highest" / "ieee",
PyTorch's default, gives float32-accurate products; :mod:`kda_compile.matmul_precision`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kda_compile.kernel_config import check_one_of, config_from_dict
from kda_compile.matmul_precision import float32_allows_tf32

PRECISIONS = ("tf32", "tf32x3", "ieee")
# how the inverse takes its 16x16 diagonal blocks: forward substitution, or products at one of the precisions
DIAG_METHODS = ("subst",) + PRECISIONS
# where the intra kernel takes the L2-norm factors of the k rows it uses as columns: in a pass after its
# products ("split", default), or in one pass before everything ("first")
NORM_PASSES = ("split", "first")


@dataclass(frozen=True)
class ChunkConfig:
    """Config of the chunkwise forward (H100 defaults: docs/triton.md)."""

    # stage intra: the Gamma kernel's K slice; the intra kernel's product K slice, K slice of its own rows
    # (None: whole rows), norm pass and warps; the solve kernel's K/V slice, warps, register cap (None: the
    # compiler's) and how it forms the inverse's diagonal blocks
    gamma_BK: int = 32
    intra_BK: int = 32
    intra_row_BK: int | None = None
    intra_norms: str = "split"
    intra_warps: int = 4
    solve_BK: int = 32
    solve_warps: int = 4
    solve_maxnreg: int | None = None
    solve_diag: str = "tf32"
    # precision of the float32 products
    precision: str = "tf32"
    solve_precision: str = "tf32"
    # stage state: V block (None: chosen per call, chunk_state.state_block_v), warps, pipelining depth
    state_BV: int | None = None
    state_warps: int = 4
    state_stages: int = 3
    # stage output: K/V blocks and warps
    o_BK: int = 128
    o_BV: int = 128
    o_warps: int = 4

    def __post_init__(self):
        check_one_of("Triton", "intra_norms", self.intra_norms, NORM_PASSES)
        check_one_of("Triton", "solve_diag", self.solve_diag, DIAG_METHODS)
        check_one_of("Triton", "precision", self.precision, PRECISIONS)
        check_one_of("Triton", "solve_precision", self.solve_precision, PRECISIONS)
        for name in ("gamma_BK", "intra_BK", "solve_BK", "o_BK", "o_BV", "intra_row_BK", "state_BV"):
            _power_of_two(name, getattr(self, name), optional=name in ("intra_row_BK", "state_BV"))


@dataclass(frozen=True)
class DecodeConfig:
    """Config of the decode kernel: V block and warps.  Default: the fastest in CUDA-graph replays on the H200 at
    B64·H32 (84 µs against 89 µs with 4 warps; equal at B1), bench/RESULTS.md."""

    decode_BV: int = 32
    decode_warps: int = 1

    def __post_init__(self):
        _power_of_two("decode_BV", self.decode_BV)


# The backward's own knobs, (name, type, default), by stage of chunk_bwd.py: (1) the reverse state recurrence:
# V block (None: chosen per call), warps, pipelining depth; (2) through W, U and the inverse and (3) dq, dk, dg:
# K/V slices and warps, and (3) the pipelining depth of its V loop; (4) group sums and the prologues' backward:
# token block and warps.
BACKWARD_KNOBS = (
    ("bwd_state_BV", int | None, None), ("bwd_state_warps", int, 4), ("bwd_state_stages", int, 2),
    ("bwd_solve_BK", int, 64), ("bwd_solve_BV", int, 64), ("bwd_solve_warps", int, 8),
    ("bwd_intra_BK", int, 32), ("bwd_intra_BV", int, 64), ("bwd_intra_warps", int, 4), ("bwd_intra_stages", int, 3),
    ("bwd_prologue_BT", int, 32), ("bwd_prologue_warps", int, 4),
)


def _check_backward(self) -> None:
    for name, _, _ in BACKWARD_KNOBS:
        if name.endswith(("_BK", "_BV", "_BT")):
            _power_of_two(name, getattr(self, name), optional=name == "bwd_state_BV")


BackwardConfig = dataclasses.make_dataclass(
    "BackwardConfig", [("forward", ChunkConfig, dataclasses.field(default_factory=ChunkConfig)), *BACKWARD_KNOBS],
    frozen=True, namespace={"__post_init__": _check_backward, "__doc__": (
        "Config of the chunkwise backward: its own stages' knobs (BACKWARD_KNOBS, keys ``bwd_*``) and the "
        "forward's config, whose intra and state stages it runs again (and whose precision fields it follows).")})


def float32_accurate_products(cfg: ChunkConfig) -> list[str]:
    """The float32-accurate product precisions ("tf32x3", "ieee") among ``cfg``'s ``precision`` and
    ``solve_precision``: the ones the Triton backward's solve kernel faults with on a GPU (chunk_bwd.check_products)."""
    return sorted({cfg.precision, cfg.solve_precision} & {"tf32x3", "ieee"})


def float32_defaults() -> dict:
    """Precision fields for float32 inputs, following PyTorch's float32 matmul precision: "highest" (or
    fp32_precision "ieee") gives float32-accurate products (3xTF32, the inverse in float32 FMA with forward
    substitution), "high"/"medium" (or "tf32") allow TF32 (~1e-3 error)."""
    if not float32_allows_tf32():
        return {"precision": "tf32x3", "solve_precision": "ieee", "solve_diag": "subst"}
    return {}


def chunk_config(config: dict | None = None, dtype: torch.dtype | None = None) -> ChunkConfig:
    """The :class:`ChunkConfig` of ``config`` (missing fields at their defaults for ``dtype``)."""
    base = float32_defaults() if dtype == torch.float32 else {}
    return config_from_dict(ChunkConfig, {**base, **(config or {})}, "Triton")


def backward_config(config: dict | None = None, dtype: torch.dtype | None = None) -> BackwardConfig:
    """The :class:`BackwardConfig` of a flat ``config`` dict holding forward keys and ``bwd_*`` keys."""
    config = dict(config or {})
    own = {f.name for f in dataclasses.fields(BackwardConfig)} - {"forward"}
    known = own | {f.name for f in dataclasses.fields(ChunkConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown Triton BackwardConfig key(s) {unknown}; known keys: {sorted(known)}")
    mine = {key: config.pop(key) for key in list(config) if key in own}
    return BackwardConfig(forward=chunk_config(config, dtype), **mine)


def decode_config(config: dict | None = None) -> DecodeConfig:
    """The :class:`DecodeConfig` of ``config``."""
    return config_from_dict(DecodeConfig, config or {}, "Triton")


def _power_of_two(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"Triton config {name} must be a power of two, got {value!r}")
