"""Fused prologues (Triton): q/k L2 norm, the KDA gate with its chunk-local cumulative sum, beta activation.

Two kernels, both memory-bound single passes:

* :func:`l2norm` -- ``x / sqrt(sum(x**2) + 1e-6)`` over the last dim (only launched with
  ``use_qk_l2norm_in_kernel``).
* :func:`chunk_gate_cumsum` -- per chunk and value head: the gate (``-exp(A_log) * softplus(g + dt_bias)``,
  or ``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))``, or ``g`` as given), then the cumulative sum
  inside the chunk, ``Gamma_r = g_1 + ... + g_r`` (design.md section 1), stored in float32; and beta after its
  activation (``sigmoid``, times 2 with ``allow_neg_eigval``), float32.

Chunks are addressed through a chunk table (``chunk_seq``, ``chunk_pos``, ``cu``), see
:mod:`kda_compile.kernels_triton.chunk_fwd`, so ragged and varlen inputs share one code path.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

L2NORM_EPS = 1e-6


def get_configs() -> list[dict]:
    """Search space of this stage: K-block width and warps of the gate/cumsum kernel."""
    return [{"gate_BK": bk, "gate_warps": w} for bk in (32, 64) for w in (2, 4)]


DEFAULT_CONFIG = {"gate_BK": 64, "gate_warps": 4}


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
def _l2norm_kernel(x, y, rows, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, eps):
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < rows)[:, None] & (o_d < D)[None, :]
    b_x = tl.load(x + o_r[:, None] * D + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    b_y = b_x * tl.rsqrt(tl.sum(b_x * b_x, 1) + eps)[:, None]
    tl.store(y + o_r[:, None] * D + o_d[None, :], b_y.to(y.dtype.element_ty), mask=m)


def l2norm(x: torch.Tensor, block_rows: int = 16, num_warps: int = 4) -> torch.Tensor:
    """L2-normalise a contiguous tensor over its last dimension (same dtype out)."""
    x = x.contiguous()
    D = x.shape[-1]
    rows = x.numel() // D
    y = torch.empty_like(x)
    if rows:
        _l2norm_kernel[(triton.cdiv(rows, block_rows),)](x, y, rows, D, block_rows, triton.next_power_of_2(D),
                                                         L2NORM_EPS, num_warps=num_warps)
    return y


@triton.jit
def _chunk_gate_cumsum_kernel(
    g, beta, A_log, dt_bias, gc, beta_out, chunk_seq, chunk_pos, cu, lower_bound,
    # task config
    HV: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
    USE_GATE: tl.constexpr, USE_LB: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr,
    # kernel config
    BK: tl.constexpr,
):
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(chunk_seq + i_c)
    bos, eos = tl.load(cu + i_n).to(tl.int64), tl.load(cu + i_n + 1).to(tl.int64)
    t0 = bos + tl.load(chunk_pos + i_c).to(tl.int64) * C
    o_t = t0 + tl.arange(0, C)
    m_t = o_t < eos
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m = m_t[:, None] & m_k[None, :]
    ptr = o_t[:, None] * (HV * K) + i_h * K + o_k[None, :]
    b_g = tl.load(g + ptr, mask=m, other=0.0).to(tl.float32)
    if USE_GATE:
        if HAS_BIAS:
            b_g += tl.load(dt_bias + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)[None, :]
        a_log = 0.0
        if HAS_A:
            a_log = tl.load(A_log + i_h).to(tl.float32)
        b_g = tl.where(m, gate_value(b_g, a_log, lower_bound, USE_LB, HAS_A), 0.0)
    tl.store(gc + ptr, tl.cumsum(b_g, 0), mask=m)
    if i_k == 0:
        b_beta = tl.load(beta + o_t * HV + i_h, mask=m_t, other=0.0).to(tl.float32)
        if BETA_SIGMOID:
            b_beta = tl.sigmoid(b_beta) * BETA_SCALE
        tl.store(beta_out + o_t * HV + i_h, b_beta, mask=m_t)


def chunk_gate_cumsum(g, beta, A_log, dt_bias, opts, table, config: dict):
    """Gate + chunk-local cumulative sum and beta activation.

    ``g [TT, HV, K]``, ``beta [TT, HV]`` (tokens flattened); returns ``(gc [TT, HV, K] float32,
    beta [TT, HV] float32)``.  ``table`` is the :class:`ChunkTable` of the call.
    """
    TT, HV, K = g.shape
    BK = min(config.get("gate_BK", 64), triton.next_power_of_2(K))
    gc = torch.empty(TT, HV, K, device=g.device, dtype=torch.float32)
    beta_out = torch.empty(TT, HV, device=g.device, dtype=torch.float32)
    use_gate = opts.use_gate_in_kernel
    grid = (table.num_chunks, HV, triton.cdiv(K, BK))
    if table.num_chunks:
        _chunk_gate_cumsum_kernel[grid](
            g, beta, A_log if A_log is not None else g, dt_bias if dt_bias is not None else g, gc, beta_out,
            table.chunk_seq, table.chunk_pos, table.cu,
            float(opts.lower_bound) if opts.lower_bound is not None else 0.0,
            HV=HV, K=K, C=table.chunk_size, USE_GATE=use_gate, USE_LB=use_gate and opts.lower_bound is not None,
            HAS_A=use_gate and A_log is not None, HAS_BIAS=use_gate and dt_bias is not None,
            BETA_SIGMOID=opts.use_beta_sigmoid_in_kernel, BETA_SCALE=2.0 if opts.allow_neg_eigval else 1.0,
            BK=BK, num_warps=config.get("gate_warps", 4))
    return gc, beta_out


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def mm(a, b, INTERPRET: tl.constexpr):
    """``tl.dot(a, b)`` (float32 accumulation).  Triton 3.6's CPU interpreter multiplies bfloat16 operands
    wrongly, so there both are widened to float32 first; on a GPU the operands' dtype is kept."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)
