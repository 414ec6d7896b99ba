"""Shape buckets: the small, documented set of call classes the autotuner measures and the dispatch keys on.

A bucket is ``op / dtype / head dims / length / layout / gate / prologue flags / parallelism``, for example
``chunk/bf16/K128V128/T8k/dense/safe/l2n/p1``.  Calls in one bucket share a winner: a kernel config that wins
at the bucket's representative shape is assumed to win for the whole class.

===========  =======================================================================================
field        values
===========  =======================================================================================
op           ``chunk`` (prefill/training, chunk_kda), ``recurrent`` (decode, fused_recurrent_kda),
             ``chunk_bwd`` (the gradients of a chunk call: the backward's kernels and their recompute)
dtype        ``bf16``, ``fp16``, ``fp32``, ``fp64``
dims         ``K{K}V{V}``
length       chunk, chunk_bwd: ``T1k`` (longest sequence <= 1024), ``T8k`` (<= 8192), ``Tlong`` (> 8192);
             recurrent: ``t1`` (one token per sequence), ``tfew`` (more: speculative decoding)
layout       ``dense`` (B sequences of equal length) or ``varlen`` (cu_seqlens)
gate         ``log`` (g is the log decay), ``gate`` (gate computed in the kernel), ``safe`` (in the kernel,
             with a lower bound)
flags        the prologues in the kernel, ``+``-joined: ``l2n`` (q/k L2 norm), ``bsig`` (beta sigmoid),
             ``neg`` (negative eigenvalues); ``none`` for none
parallelism  sequences x value heads against the GPU's SM count: ``p0`` (fewer than the SMs), ``p1`` (up to
             4x), ``p4`` (more); ``any`` for an entry measured without the class (older tables)
===========  =======================================================================================

Batch invariance.  A sequence must give the same bits alone, in a batch and in a varlen pack.  The layout, the
parallelism class and, for a pack, the length class depend on the batch, not on the sequence, so they may only
select knobs that leave the bits unchanged (warps, pipelining stages, V blocking of the matrix-product
kernels: :data:`BIT_NEUTRAL`).  The backend and every other knob (K blocking, precision, the inverse's diagonal
method, the TileLang segment length, every knob of the decode kernels, whose sums over K follow the thread
layout: :data:`BIT_CHANGING`) are chosen per *sequence class*, :attr:`Bucket.sequence_key` (op, dtype, dims, gate,
prologue flags); the tuner and the table loader enforce it.  The length is left out of the sequence class on
purpose: a pack holds sequences of several length classes and is run with one config, so only knobs that are
equal across length classes keep every sequence's bits whatever pack it is in.  The backward is a bucket op of
its own (``chunk_bwd``): its knobs, and those of the forward's stages that its recompute runs, follow the same rule
per ``chunk_bwd`` sequence class, independently of the forward's entries.

Varlen packs are classed (for the bit-neutral knobs) by their longest sequence when the offsets can be read
without a device sync (CPU ``cu_seqlens``); otherwise by the packed length T, an upper bound (the fallback: the
common case of GPU offsets; the default varlen bucket is tuned at that class).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
NAME_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
CHUNK_LENGTHS = (("T1k", 1024), ("T8k", 8192), ("Tlong", None))
GATES = ("log", "gate", "safe")
FLAGS = ("l2n", "bsig", "neg")
PARALLELISM = ("p0", "p1", "p4", "any")
BACKWARD_OP = "chunk_bwd"
# Ops the tuner measures and tables key on; each maps to the op of the call it is measured on (KDACall.op).
TUNED_OPS = {"chunk": "chunk", "recurrent": "recurrent", BACKWARD_OP: "chunk"}

# Knobs per backend that change the order of a reduction, hence the bits of the result: chosen per sequence class
# only.  Every knob not listed in BIT_NEUTRAL counts as bit-changing (a new knob is safe until classified).
BIT_CHANGING = {
    # The decode kernels reduce over K with element-wise sums whose thread layout follows the tile shape and the
    # warps (threads), so all their knobs change bits.
    "triton": ("gamma_BK", "intra_BK", "intra_row_BK", "intra_norms", "solve_BK", "solve_diag", "precision",
               "solve_precision", "o_BK", "bwd_solve_BK", "bwd_intra_BK", "decode_BV", "decode_warps"),
    "tilelang": ("segment_len", "layout", "decode_threads", "decode_BV", "bwd_intra_BK"),
    "reference": (),
}
# Knobs that only change how the work is spread (warps/threads of a non-reducing split, pipelining, V blocks):
# these may differ between buckets of one sequence class.
BIT_NEUTRAL = {
    "triton": ("intra_warps", "solve_warps", "solve_maxnreg", "state_BV", "state_warps", "state_stages", "o_BV",
               "o_warps", "bwd_state_BV", "bwd_state_warps", "bwd_state_stages",
               "bwd_solve_BV", "bwd_solve_warps", "bwd_intra_BV", "bwd_intra_warps", "bwd_intra_stages",
               "bwd_prologue_BT",
               "bwd_prologue_warps"),
    "tilelang": ("state_BV", "threads", "intra_threads", "states_BV", "bwd_state_BV", "bwd_solve_BV",
                 "bwd_solve_threads", "bwd_intra_BV", "bwd_intra_threads", "bwd_prologue_BT"),
    "reference": (),
}


def is_bit_changing(backend: str, knob: str) -> bool:
    """Whether ``knob`` of ``backend`` may change the bits of the result (anything not known to be neutral)."""
    return knob not in BIT_NEUTRAL.get(backend, ())


def bit_changing_part(backend: str, config: dict) -> dict:
    """The knobs of ``config`` that must be equal across every bucket of one sequence class."""
    return {k: v for k, v in config.items() if is_bit_changing(backend, k)}


def with_bit_changing(backend: str, config: dict, fixed: dict) -> dict:
    """``config`` with its bit-changing knobs replaced by exactly those of ``fixed`` (unset ones at default)."""
    return {**{k: v for k, v in config.items() if not is_bit_changing(backend, k)}, **fixed}


@dataclass(frozen=True)
class Bucket:
    op: str
    dtype: str
    K: int
    V: int
    length: str
    layout: str
    gate: str = "log"
    flags: str = "l2n"
    parallelism: str = "any"

    @property
    def key(self) -> str:
        return (f"{self.op}/{self.dtype}/K{self.K}V{self.V}/{self.length}/{self.layout}/{self.gate}/{self.flags}/"
                f"{self.parallelism}")

    @property
    def sequence_key(self) -> str:
        """The per-sequence class: backend and bit-changing knobs are shared by all buckets with this key."""
        return f"{self.op}/{self.dtype}/K{self.K}V{self.V}/{self.gate}/{self.flags}"

    def any_parallelism(self) -> "Bucket":
        return replace(self, parallelism="any")

    @classmethod
    def parse(cls, key: str) -> "Bucket":
        """Inverse of :attr:`key`; raises ValueError naming the bad part.  An older 5-part key
        (``op/dtype/dims/length/layout``, measured with a log gate and the q/k L2 norm in the kernel) maps to
        the bucket it was measured in, with parallelism ``any``."""
        parts = key.split("/")
        try:
            if len(parts) == 5:
                parts += ["log", "l2n", "any"]
            op, dtype, dims, length, layout, gate, flags, par = parts
            K, V = dims[1:].split("V")
            bucket = cls(op, dtype, int(K), int(V), length, layout, gate, flags, par)
        except ValueError:
            raise ValueError(f"bucket key must look like 'chunk/bf16/K128V128/T8k/dense/log/l2n/p1', "
                             f"got {key!r}") from None
        if op not in TUNED_OPS or dtype not in NAME_DTYPES or layout not in ("dense", "varlen") \
                or gate not in GATES or par not in PARALLELISM \
                or not (flags == "none" or set(flags.split("+")) <= set(FLAGS)):
            raise ValueError(f"bucket key {key!r}: op must be one of {list(TUNED_OPS)}, dtype one of "
                             f"{list(NAME_DTYPES)}, layout dense|varlen, gate one of {GATES}, flags 'none' or "
                             f"'+'-joined {FLAGS}, parallelism one of {PARALLELISM}")
        return bucket


def length_class(op: str, longest: int) -> str:
    if op == "recurrent":
        return "t1" if longest <= 1 else "tfew"
    for name, limit in CHUNK_LENGTHS:
        if limit is None or longest <= limit:
            return name
    raise AssertionError("unreachable")


def gate_mode(opts) -> str:
    """``log``, ``gate`` or ``safe`` for a :class:`kda_compile.reference.KDAOptions`."""
    if not opts.use_gate_in_kernel:
        return "log"
    return "safe" if opts.lower_bound is not None else "gate"


def prologue_flags(opts) -> str:
    flags = [name for name, on in zip(FLAGS, (opts.use_qk_l2norm_in_kernel, opts.use_beta_sigmoid_in_kernel,
                                              opts.allow_neg_eigval)) if on]
    return "+".join(flags) or "none"


_SM_COUNTS: dict[str, int] = {}


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 1 elsewhere (no parallelism classes on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    key = str(device)
    if key not in _SM_COUNTS:
        index = device.index if device.index is not None else torch.cuda.current_device()
        _SM_COUNTS[key] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[key]


def parallelism_class(sequences: int, heads: int, sms: int) -> str:
    """``p0``: fewer (sequence, head) programs than SMs; ``p1``: up to 4 per SM; ``p4``: more."""
    work = sequences * heads
    return "p0" if work < sms else "p1" if work <= 4 * sms else "p4"


def longest_sequence(call) -> int:
    """Tokens of the longest sequence, read without a device sync: dense T, varlen offsets on the CPU, else
    the packed T (an upper bound: the documented fallback)."""
    p = call.problem
    cu = call.cu_seqlens
    if p.varlen and cu is not None and cu.device.type == "cpu" and cu.numel() > 1:
        return int((cu[1:] - cu[:-1]).max())
    return p.T


def bucket_of(call, sms: int | None = None, op: str | None = None) -> Bucket:
    """The bucket of a :class:`kda_compile.dispatch.KDACall` (no device sync); ``op`` names a tuned op other
    than the call's own (``chunk_bwd``: the backward of a chunk call)."""
    p = call.problem
    sms = sm_count(p.device) if sms is None else sms
    op = op or call.op
    if TUNED_OPS.get(op) != call.op:
        raise ValueError(f"op {op!r} is not measured on {call.op!r} calls (tuned ops: {TUNED_OPS})")
    return Bucket(op, DTYPE_NAMES.get(p.dtype, str(p.dtype)), p.K, p.V,
                  length_class(op, longest_sequence(call)), "varlen" if p.varlen else "dense",
                  gate_mode(call.opts), prologue_flags(call.opts), parallelism_class(p.N, p.HV, sms))


# ------------------------------------------------------------------------------- what the tuner measures

@dataclass(frozen=True)
class TuneShape:
    """A representative problem of a bucket: ``N`` sequences of ``T`` tokens, H key heads, HV value heads."""

    bucket: Bucket
    N: int
    T: int
    H: int
    HV: int


def tune_shape(op: str, dtype: str, D: int, N: int, T: int, H: int, layout: str = "dense", gate: str = "log",
               flags: str = "l2n", sms: int = 1) -> TuneShape:
    """The :class:`TuneShape` of N sequences of T tokens, with the bucket :func:`bucket_of` gives such a call
    (a varlen pack of them with its offsets on the GPU: classed by the packed length N·T)."""
    length = length_class(op, N * T if layout == "varlen" else T)
    bucket = Bucket(op, dtype, D, D, length, layout, gate, flags, parallelism_class(N, H, sms))
    return TuneShape(bucket, N, T, H, H)


def default_tune_shapes(device: str, dtypes=("bf16",), dims=(128,), ops=tuple(TUNED_OPS),
                        gates=("log", "safe")) -> list[TuneShape]:
    """The buckets tuned by default, most used first (a budget-limited run covers what real workloads hit):
    prefill T8k, decode t1, long prefill, varlen, then the rest (short prefill, the many-heads T8k shape), and last
    the backward (training) at T8k, whose TileLang candidates take the longest to compile.
    On CUDA these are the standard shapes of bench/RESULTS.md; on the CPU they are small (the CPU backends are
    for correctness checks, tuning there exercises the machinery)."""
    gpu = device.startswith("cuda")
    sms = sm_count(device)
    first, rest, last = [], [], []
    for dtype in dtypes:
        for D in dims:
            for gate in gates:
                def shape(op, N, T, H, layout="dense"):
                    return tune_shape(op, dtype, D, N, T, H, layout, gate, "l2n", sms)
                if not gpu:
                    if "chunk" in ops:
                        first.append(shape("chunk", 1, 100, 1))
                    if "recurrent" in ops:
                        first.append(shape("recurrent", 2, 1, 1))
                    if BACKWARD_OP in ops:
                        first.append(shape(BACKWARD_OP, 1, 100, 1))
                    continue
                if "chunk" in ops:
                    first += [shape("chunk", 2, 8192, 16)]
                if "recurrent" in ops:
                    first += [shape("recurrent", 64, 1, 32)]
                if "chunk" in ops:
                    first += [shape("chunk", 1, 32768, 16), shape("chunk", 4, 4096, 16, "varlen")]
                    rest += [shape("chunk", 16, 1024, 16), shape("chunk", 8, 4096, 32)]
                if BACKWARD_OP in ops:
                    last += [shape(BACKWARD_OP, 2, 8192, 16)]

    def rank(s: TuneShape) -> int:
        b = s.bucket
        if b.op == BACKWARD_OP:
            return 4
        if b.layout == "varlen":
            return 3
        return {"chunk/T8k": 0, "recurrent/t1": 1, "chunk/Tlong": 2}.get(f"{b.op}/{b.length}", 9)
    first.sort(key=rank)  # stable
    return first + rest + last
