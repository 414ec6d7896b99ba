"""Prologues (Triton): q/k L2 norm, the KDA gate and its chunk-local cumulative sum, beta activation.

These are ``@triton.jit`` helpers fused into the kernels that consume them (chunk_intra.py, and
fused_recurrent.py for decode), so no prologue costs a pass over memory of its own:

* :func:`gate_value` -- ``-exp(A_log) * softplus(g + dt_bias)``, or with ``lower_bound`` set
  ``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))`` (``A_log`` optional there);
* :func:`gate_tile` / :func:`chunk_gamma` -- a ``[C, BK]`` tile of the gate, then
  ``Gamma_r = g_1 + ... + g_r`` inside the chunk (float32; docs/algorithm.md);
* :func:`beta_act` -- ``sigmoid(beta)`` (times 2 with ``allow_neg_eigval``) when beta arrives as logits;
* :func:`finite_or_zero` -- zeroes NaN and infinities before a dense product, where a masked-out 0 times a
  NaN would leak into rows that never depended on it.

* :func:`row_norms` / :func:`l2norm_factors` -- the factors of the L2 norm ``x / sqrt(sum(x**2) + L2NORM_EPS)``,
  applied where the rows are loaded (decode normalises its single row inline).

Also :func:`chunk_bounds`, the chunk-table lookup every per-chunk kernel starts with.

Also here: :func:`interpreting` and :func:`mm`, the two places where the CPU interpreter (tests) differs.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

L2NORM_EPS = tl.constexpr(1e-6)  # as kda_compile.reference.L2NORM_EPS
# Largest |Gamma - Gamma_ref| inside a 16-token block for which the intra-chunk kernels factor every block
# as exp(Gamma_r - ref) * exp(ref - Gamma_s) (both factors <= exp(60), far from float32 overflow at exp(88)).
SPAN_MAX = tl.constexpr(60.0)
# Floor of the log decay.  exp(G_FLOOR) is 0 in float32 (and float64), so a gate of -inf ("forget everything")
# floored here keeps its meaning, while differences of cumulative sums stay finite (-inf - -inf would be NaN).
G_FLOOR = tl.constexpr(-1000.0)


# Tests only: with KDA_TRITON_EMULATE_TF32=1 in the environment of an interpreted run, :func:`mm` rounds the float32
# operands of its "tf32" products to TF32 (10-bit mantissa, to nearest), as the GPU's tensor cores do; without it
# the interpreter multiplies in float32, which hides where TF32 rounding costs accuracy.
EMULATE_TF32 = tl.constexpr(os.environ.get("KDA_TRITON_EMULATE_TF32", "0") == "1")


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _tf32(x):
    """float32 ``x`` rounded to TF32 (the 13 low mantissa bits, to nearest with ties away from zero)."""
    return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def mm(a, b, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    """``tl.dot(a, b)`` (float32 accumulation; ``PREC`` is the product's precision when both operands are
    float32: "tf32", "tf32x3" or "ieee").  Triton 3.6's CPU interpreter multiplies bfloat16 operands
    wrongly, so there both are widened to float32 first (and rounded to TF32 under EMULATE_TF32); on a GPU the
    operands' dtype is kept."""
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        if EMULATE_TF32 and PREC == "tf32":
            a = _tf32(a)
            b = _tf32(b)
        return tl.dot(a, b)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _softplus(x):
    # log(1 + exp(x)), linear above 20 as torch.nn.functional.softplus
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def gate_value(x, a_log, lower_bound, USE_LB: tl.constexpr, HAS_A: tl.constexpr):
    """The KDA gate of a raw gate value ``x`` (``dt_bias`` already added); float32 in, float32 out."""
    if USE_LB:
        if HAS_A:
            x = x * tl.exp(a_log)
        return lower_bound * tl.sigmoid(x)
    else:
        return -tl.exp(a_log) * _softplus(x)


@triton.jit
def row_norms(x, o_t, m_t, i_kh, H: tl.constexpr, K: tl.constexpr, R: tl.constexpr, BK: tl.constexpr):
    """``1 / sqrt(sum(x**2) + eps)`` of the rows ``o_t`` (``[R]``, valid where ``m_t``; others give 1/sqrt(eps)
    and must not be used) of key head ``i_kh`` of ``x [TT, H, K]``."""
    s_x = tl.zeros([R], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_x = tl.load(x + o_t[:, None] * (H * K) + i_kh * K + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :],
                      other=0.0).to(tl.float32)
        s_x += tl.sum(b_x * b_x, 1)
    return tl.rsqrt(s_x + L2NORM_EPS)


@triton.jit
def l2norm_factors(q, k, o_t, m_t, i_kh, H: tl.constexpr, K: tl.constexpr, R: tl.constexpr, BK: tl.constexpr,
                   L2NORM: tl.constexpr):
    """``(r_q, r_k)``, ``[R]`` float32: the L2-norm factors (:func:`row_norms`) of rows ``o_t`` of q and k, or ones
    without ``L2NORM``."""
    r_q = tl.full([R], 1.0, tl.float32)
    r_k = tl.full([R], 1.0, tl.float32)
    if L2NORM:
        r_q = row_norms(q, o_t, m_t, i_kh, H, K, R, BK)
        r_k = row_norms(k, o_t, m_t, i_kh, H, K, R, BK)
    return r_q, r_k


@triton.jit
def chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C: tl.constexpr):
    """``(first token, end of its sequence, last token)`` of chunk ``i_c`` of the chunk table
    (chunk_fwd.ChunkTable), in the flat token axis (int64)."""
    i_n = tl.load(chunk_seq + i_c)
    bos, eos = tl.load(cu + i_n).to(tl.int64), tl.load(cu + i_n + 1).to(tl.int64)
    t0 = bos + tl.load(chunk_pos + i_c).to(tl.int64) * C
    return t0, eos, tl.minimum(t0 + C, eos) - 1


@triton.jit
def state_walk_program(cu, seq_first, s_k, s_v, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr):
    """The program of a walk over one sequence's chunks (grid: V blocks x sequences * HV): ``(i_n, i_h, bos, eos,
    first, o_k, m_k, o_v, m_v, m_kv, p_state)``: sequence, value head, its token range, its first chunk, the
    tile's K and V offsets and masks, and the offsets of its ``[BK, BV]`` tile in an ``[N, HV, K, V]`` state whose
    K and V strides are ``s_k`` and ``s_v`` (swapped for ``state_v_first``)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // HV, i_nh % HV
    bos, eos = tl.load(cu + i_n).to(tl.int64), tl.load(cu + i_n + 1).to(tl.int64)
    first = tl.load(seq_first + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = (i_n * HV + i_h).to(tl.int64) * (K * V) + o_k[:, None] * s_k + o_v[None, :] * s_v
    return i_n, i_h, bos, eos, first, o_k, m_k, o_v, m_v, m_kv, p_state


@triton.jit
def state_tile(state, p_state, m_kv, BK: tl.constexpr, BV: tl.constexpr, PRESENT: tl.constexpr):
    """The float32 ``[BK, BV]`` tile of ``state`` at ``p_state``, or zeros when ``PRESENT`` is off."""
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if PRESENT:
        b_s += tl.load(state + p_state, mask=m_kv, other=0.0).to(tl.float32)
    return b_s


@triton.jit
def beta_act(b, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr):
    """Beta as the delta rule uses it (float32)."""
    b = b.to(tl.float32)
    if BETA_SIGMOID:
        b = tl.sigmoid(b) * BETA_SCALE
    return b


@triton.jit
def gate_tile(g, A_log, dt_bias, lower_bound, o_t, m, i_h, o_k, m_k,
              HV: tl.constexpr, K: tl.constexpr, USE_GATE: tl.constexpr, USE_LB: tl.constexpr,
              HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The per-token log decay (float32, 0 where ``m`` is false, floored at G_FLOOR) of tokens ``o_t`` and
    channels ``o_k`` of value head ``i_h``: the gate of ``g [TT, HV, K]`` when ``USE_GATE``, else g as given."""
    b_g = tl.load(g + o_t[:, None] * (HV * K) + i_h * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    if USE_GATE:
        if HAS_BIAS:
            b_g += tl.load(dt_bias + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)[None, :]
        a_log = 0.0
        if HAS_A:
            a_log = tl.load(A_log + i_h).to(tl.float32)
        b_g = tl.where(m, gate_value(b_g, a_log, lower_bound, USE_LB, HAS_A), 0.0)
    return tl.where(b_g < G_FLOOR, G_FLOOR, b_g)   # -inf -> G_FLOOR; NaN stays NaN


@triton.jit
def finite_or_zero(x):
    """``x`` with NaN and +-inf replaced by 0."""
    return tl.where(tl.abs(x) < float("inf"), x, 0.0)


@triton.jit
def chunk_beta(beta, o_t, m_t, i_h, HV: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr):
    """Beta (:func:`beta_act`) of tokens ``o_t`` of value head ``i_h`` of ``beta [TT, HV]``, 0 where ``m_t``
    is false."""
    return tl.where(m_t, beta_act(tl.load(beta + o_t * HV + i_h, mask=m_t, other=0.0), BETA_SIGMOID, BETA_SCALE),
                    0.0)


@triton.jit
def chunk_gamma(g, A_log, dt_bias, lower_bound, o_t, m, i_h, o_k, m_k,
                HV: tl.constexpr, K: tl.constexpr, USE_GATE: tl.constexpr, USE_LB: tl.constexpr,
                HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``Gamma`` for tokens ``o_t`` (one chunk, masked rows contribute 0) and channels ``o_k`` of value head
    ``i_h``: :func:`gate_tile` cumulated over the chunk."""
    return tl.cumsum(gate_tile(g, A_log, dt_bias, lower_bound, o_t, m, i_h, o_k, m_k, HV, K, USE_GATE, USE_LB,
                               HAS_A, HAS_BIAS), 0)

