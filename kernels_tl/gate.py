"""Fused prologues shared by every stage: the KDA gate, the q/k L2 norm and the beta activation.

These are expression builders (plain Python returning TileLang ``PrimExpr``), so each kernel applies the
prologue where it loads the data, without an extra pass over HBM.  The math is that of
:mod:`kda_compile.reference` (``kda_gate``, ``l2_normalize``, ``beta_activation``).
"""
from __future__ import annotations

from dataclasses import dataclass

import tilelang.language as T

from ..reference import L2NORM_EPS, KDAOptions

SOFTPLUS_THRESHOLD = 20.0  # softplus(x) == x to float32 precision above this (as torch.nn.functional.softplus)
# Floor of the log decay: exp(G_FLOOR) is 0 in float32, so a gate of -inf ("forget everything") floored here keeps
# its meaning while differences of cumulative sums stay finite (-inf - -inf would be NaN).  As the Triton twin.
G_FLOOR = -1000.0
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Prologue:
    """Compile-time switches of the fused prologue (part of every kernel's cache key)."""

    l2norm: bool = False          # q and k are L2-normalised over K
    gate: bool = False            # g is the raw gate: apply kda_gate
    has_A_log: bool = False
    has_dt_bias: bool = False
    lower_bound: float | None = None  # safe gate: lower_bound * sigmoid(...)
    beta_sigmoid: bool = False    # beta arrives as logits
    beta_scale: float = 1.0       # 2.0 with allow_neg_eigval

    @staticmethod
    def from_call(opts: KDAOptions, has_A_log: bool, has_dt_bias: bool) -> "Prologue":
        return Prologue(l2norm=opts.use_qk_l2norm_in_kernel, gate=opts.use_gate_in_kernel,
                        has_A_log=has_A_log and opts.use_gate_in_kernel,
                        has_dt_bias=has_dt_bias and opts.use_gate_in_kernel,
                        lower_bound=opts.lower_bound if opts.use_gate_in_kernel else None,
                        beta_sigmoid=opts.use_beta_sigmoid_in_kernel,
                        beta_scale=2.0 if opts.allow_neg_eigval else 1.0)


def sigmoid(x):
    return 1.0 / (1.0 + T.exp(-x))


def softplus(x):
    return T.if_then_else(x > SOFTPLUS_THRESHOLD, x, T.log(1.0 + T.exp(T.min(x, SOFTPLUS_THRESHOLD))))


def log_decay(p: Prologue, g, a_log, dt_bias):
    """Log-space decay of one element: ``g`` as given, or the KDA gate of the raw gate ``g`` (float32).
    ``a_log`` is A_log of the value head, ``dt_bias`` the bias of this channel (ignored when absent)."""
    if not p.gate:
        return g
    x = g + dt_bias if p.has_dt_bias else g
    if p.lower_bound is not None:
        if p.has_A_log:
            x = T.exp(a_log) * x
        return p.lower_bound * sigmoid(x)
    return -T.exp(a_log) * softplus(x)


def beta_value(p: Prologue, b):
    """Beta as the delta rule uses it (``b`` float32)."""
    if not p.beta_sigmoid:
        return b
    return p.beta_scale * sigmoid(b)


def finite_or_zero(x):
    """``x`` with NaN and +-inf replaced by 0 (a NaN fails every comparison)."""
    return T.if_then_else(T.And(x <= FLOAT32_MAX, x >= -FLOAT32_MAX), x, 0.0)


def inv_norm(sum_sq):
    """``1 / sqrt(sum(x^2) + eps)``, the L2-norm factor (same epsilon as the reference)."""
    return T.rsqrt(sum_sq + L2NORM_EPS)


@T.macro
def row_inv_norms(ops, x, work, sums, out):
    """``out[r] = inv_norm(sum_c x[r, c]^2)`` for a tile ``x [R, C]``; ``work [R, C]`` and ``sums [R]`` are
    float32 scratch (a row reduction: a serial loop per row would hit one shared-memory bank)."""
    for r, c in ops.Parallel(x.shape[0], x.shape[1]):
        work[r, c] = T.cast(x[r, c], "float32") * T.cast(x[r, c], "float32")
    ops.rowsum(work, sums)
    for r in ops.Parallel(x.shape[0]):
        out[r] = inv_norm(sums[r])


@T.macro
def vector_inv_norm(ops, x, work, out):
    """``out[j] = inv_norm(sum_c x[c]^2)`` for every column j of ``work [C, J]`` (the same number in each: the
    factor of one vector ``x [C]``, spread over the threads that hold the columns)."""
    for c, j in ops.Parallel(work.shape[0], work.shape[1]):
        work[c, j] = x[c] * x[c]
    ops.colsum(work, out)
    for j in ops.Parallel(work.shape[1]):
        out[j] = inv_norm(out[j])
