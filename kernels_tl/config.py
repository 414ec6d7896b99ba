"""Kernel configs of the TileLang backend: one typed dataclass per op, defaults in one place.

A config travels as a plain dict (tuned tables are JSON); :func:`chunk_config` / :func:`decode_config` turn it
into the dataclass and reject unknown keys and bad values before anything compiles.  The knobs are those the
autotune space varies; fixed choices are constants beside the kernels (docs/tilelang.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from kda_compile.kernel_config import check_one_of, config_from_dict

DECODE_LAYOUTS = ("column", "tile")


# Segment length (tokens) of the intra-GPU sequence split per GPU model: a sequence longer than this is cut into
# segments of this many tokens (docs/tilelang.md, "Fused forward").  It depends on the GPU model only, never on the
# batch, so a sequence gives the same bits alone and in any batch or pack.  Paper estimates, to be swept.
SEGMENT_LEN = {"H100": 4096, "H200": 4096}
DEFAULT_SEGMENT_LEN = 4096   # other CUDA GPUs
SEGMENT_LENS = (0, 64, 128, 1024, 2048, 4096, 8192, 16384)   # 0: never split


@dataclass(frozen=True)
class ChunkConfig:
    """Config of the fused chunkwise forward (:mod:`.chunk_fused`): ``state_BV`` state columns per program (capped
    at K and V), ``threads`` per program, ``segment_len`` (tokens per segment of the sequence split; None: the GPU
    model's value in SEGMENT_LEN; 0: never split).  A tuned table must give every bucket of a GPU the same
    ``segment_len`` (batch invariance)."""

    state_BV: int = 64
    threads: int = 256
    segment_len: int | None = None

    def __post_init__(self):
        check_one_of("TileLang", "state_BV", self.state_BV, (16, 32, 64, 128))
        check_one_of("TileLang", "threads", self.threads, (128, 256))
        if self.segment_len is not None:
            check_one_of("TileLang", "segment_len", self.segment_len, SEGMENT_LENS)


def segment_length(config: ChunkConfig, device) -> int:
    """Tokens per segment for ``device``: the config's, else the GPU model's (0 on the CPU: no split)."""
    if config.segment_len is not None:
        return config.segment_len
    if getattr(device, "type", str(device)) != "cuda":
        return 0
    import torch
    name = torch.cuda.get_device_name(device)
    return next((n for model, n in SEGMENT_LEN.items() if model in name), DEFAULT_SEGMENT_LEN)


def get_configs() -> list[dict]:
    """Search space of the fused forward for one GPU call of the lead's sweep: columns per program, threads and
    segment length (the tuned segment length must then be written for every bucket of the GPU alike)."""
    import itertools
    return [dict(state_BV=bv, threads=t, segment_len=s)
            for bv, t, s in itertools.product((32, 64, 128), (128, 256), (2048, 4096, 8192))]


@dataclass(frozen=True)
class DecodeConfig:
    """Config of the decode kernel: ``layout`` "column" (one thread per state column) or "tile" (a reduction
    over a [K, decode_BV] tile with ``decode_threads`` threads)."""

    layout: str = "column"
    decode_BV: int = 128
    decode_threads: int = 128

    def __post_init__(self):
        check_one_of("TileLang", "layout", self.layout, DECODE_LAYOUTS)
        check_one_of("TileLang", "decode_BV", self.decode_BV, (16, 32, 64, 128))
        if self.layout == "column" and self.decode_threads != self.decode_BV:
            raise ValueError("TileLang decode_threads must equal decode_BV with layout='column' (a thread per "
                             f"column), got {self.decode_threads} and {self.decode_BV}")


@dataclass(frozen=True)
class BackwardConfig:
    """Config of the chunkwise backward (kernels_tl/chunk_bwd.py).  ``intra_threads``: the intra kernel that
    recomputes the forward's intermediates (chunk_intra.py); ``states_BV`` the value block of the state recompute;
    the ``bwd_*`` keys the backward stages' blocks and thread counts (clipped to K, V)."""

    intra_threads: int = 256
    states_BV: int = 32
    bwd_state_BV: int = 32
    bwd_solve_BV: int = 32
    bwd_solve_threads: int = 256
    bwd_intra_BK: int = 64
    bwd_intra_BV: int = 32
    bwd_intra_threads: int = 256
    bwd_prologue_BT: int = 32

    def __post_init__(self):
        check_one_of("TileLang", "intra_threads", self.intra_threads, (128, 256))
        for name in ("states_BV", "bwd_state_BV", "bwd_solve_BV", "bwd_intra_BK", "bwd_intra_BV"):
            check_one_of("TileLang", name, getattr(self, name), (16, 32, 64, 128))
        for name in ("bwd_solve_threads", "bwd_intra_threads"):
            check_one_of("TileLang", name, getattr(self, name), (128, 256))
        check_one_of("TileLang", "bwd_prologue_BT", self.bwd_prologue_BT, (16, 32, 64))


def get_backward_configs() -> list[dict]:
    """Search space of the backward: the recompute's intra threads and state value block, then each backward
    stage's blocks and threads (products, searched knob by knob)."""
    import itertools
    return ([{"intra_threads": 128}] + [{"states_BV": bv} for bv in (16, 64)]
            + [{"bwd_state_BV": bv} for bv in (16, 64)]
            + [dict(bwd_solve_BV=bv, bwd_solve_threads=t) for bv, t in itertools.product((16, 32, 64), (128, 256))]
            + [dict(bwd_intra_BK=bk, bwd_intra_BV=bv, bwd_intra_threads=t)
               for bk, bv, t in itertools.product((32, 64, 128), (16, 32, 64), (128, 256))]
            + [{"bwd_prologue_BT": bt} for bt in (16, 64)])


def backward_config(config: dict | None = None) -> BackwardConfig:
    """The :class:`BackwardConfig` of ``config`` (missing fields at their defaults)."""
    return config_from_dict(BackwardConfig, config or {}, "TileLang")


def chunk_config(config: dict | None = None) -> ChunkConfig:
    """The :class:`ChunkConfig` of ``config`` (missing fields at their defaults)."""
    return config_from_dict(ChunkConfig, config or {}, "TileLang")


def decode_config(config: dict | None = None) -> DecodeConfig:
    """The :class:`DecodeConfig` of ``config`` (missing fields at their defaults)."""
    return config_from_dict(DecodeConfig, config or {}, "TileLang")
