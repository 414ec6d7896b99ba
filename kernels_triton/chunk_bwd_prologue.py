"""Stage 4 of the Triton backward: the q/k and beta prologues (docs/algorithm.md, "The chunkwise backward", section 6).

One program per (token block, key head):

* dq, dk: the float32 per-value-head gradients of the intra stage summed over the key head's group of value
  heads in a fixed order (deterministic, no atomics), then the L2 norm's backward ``r (dy - y (y . dy))``
  with the raw rows; written in q's / k's dtype (with one value head per key head and no L2 norm in the kernel the
  intra stage writes them final, and this stage leaves them);
* dbeta of the group's value heads: the solve stage's term plus the intra stage's per-K-block terms (fixed
  order), then the sigmoid's backward when beta arrives as logits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gate import L2NORM_EPS


def get_configs() -> list[dict]:
    """Search space of this stage (a product, searched knob by knob): token block and warps."""
    return [{"bwd_prologue_BT": bt, "bwd_prologue_warps": w} for bt in (16, 32, 64) for w in (4, 8)]


@triton.jit
def _l2norm_bwd(x, dy, L2NORM: tl.constexpr):
    """Gradient of ``x / sqrt(sum(x**2) + eps)`` over the last axis (``dy`` as is without ``L2NORM``)."""
    if L2NORM:
        r = tl.rsqrt(tl.sum(x * x, 1) + L2NORM_EPS)
        y = x * r[:, None]
        dy = r[:, None] * (dy - y * tl.sum(y * dy, 1)[:, None])
    return dy


@triton.jit
def kda_bwd_prologue_kernel(
    q, k, beta, dq_h, dk_h, dbeta_solve, dbeta_part, dq, dk, dbeta, TT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, NKB: tl.constexpr, L2NORM: tl.constexpr,
    BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, DQDK: tl.constexpr,
):
    i_t, i_kh = tl.program_id(0), tl.program_id(1)
    GROUP: tl.constexpr = HV // H
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    m_t = o_t < TT
    o_k = tl.arange(0, BK)
    m = m_t[:, None] & (o_k < K)[None, :]
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    for i_g in tl.static_range(GROUP):
        i_h = i_kh * GROUP + i_g
        p_h = o_t[:, None] * (HV * K) + i_h * K + o_k[None, :]
        if DQDK:
            b_dq += tl.load(dq_h + p_h, mask=m, other=0.0)
            b_dk += tl.load(dk_h + p_h, mask=m, other=0.0)
        b_db = tl.load(dbeta_solve + o_t * HV + i_h, mask=m_t, other=0.0)
        for i_kb in tl.static_range(NKB):
            b_db += tl.load(dbeta_part + i_kb * TT * HV + o_t * HV + i_h, mask=m_t, other=0.0)
        if BETA_SIGMOID:
            s = tl.sigmoid(tl.load(beta + o_t * HV + i_h, mask=m_t, other=0.0).to(tl.float32))
            b_db = b_db * BETA_SCALE * s * (1.0 - s)
        tl.store(dbeta + o_t * HV + i_h, b_db.to(dbeta.dtype.element_ty), mask=m_t)
    if DQDK:
        p_x = o_t[:, None] * (H * K) + i_kh * K + o_k[None, :]
        b_q = tl.load(q + p_x, mask=m, other=0.0).to(tl.float32)
        tl.store(dq + p_x, _l2norm_bwd(b_q, b_dq, L2NORM).to(dq.dtype.element_ty), mask=m)
        b_k = tl.load(k + p_x, mask=m, other=0.0).to(tl.float32)
        tl.store(dk + p_x, _l2norm_bwd(b_k, b_dk, L2NORM).to(dk.dtype.element_ty), mask=m)


def intra_writes_final(H: int, HV: int, opts) -> bool:
    """Whether the intra stage writes dq and dk final, in q's and k's dtype: one value head per key head and no L2
    norm in the kernel leave nothing to sum or to differentiate here."""
    return HV == H and not opts.use_qk_l2norm_in_kernel


def chunk_bwd_prologue(q, k, beta, dq_h, dk_h, dbeta_solve, dbeta_part, opts, cfg):
    """Run the stage on flat tensors; returns ``(dq [TT, H, K], dk, dbeta [TT, HV])`` in the inputs' dtypes (``dq_h``
    and ``dk_h`` themselves when the intra stage wrote them final, in q's and k's dtype)."""
    TT, H, K = q.shape
    HV = dq_h.shape[1]
    final = intra_writes_final(H, HV, opts)
    dq, dk = (dq_h.view_as(q), dk_h.view_as(k)) if final else (torch.empty_like(q), torch.empty_like(k))
    dbeta = torch.empty_like(beta)
    BT = cfg.bwd_prologue_BT
    if TT:
        kda_bwd_prologue_kernel[(triton.cdiv(TT, BT), H)](
            q, k, beta, dq_h, dk_h, dbeta_solve, dbeta_part, dq, dk, dbeta, TT,
            H=H, HV=HV, K=K, NKB=dbeta_part.shape[0], L2NORM=opts.use_qk_l2norm_in_kernel,
            BETA_SIGMOID=opts.use_beta_sigmoid_in_kernel, BETA_SCALE=2.0 if opts.allow_neg_eigval else 1.0,
            BT=BT, BK=triton.next_power_of_2(K), DQDK=not final, num_warps=cfg.bwd_prologue_warps)
    return dq, dk, dbeta
