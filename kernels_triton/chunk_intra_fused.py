"""Stage 1, second organisation (``intra_impl="fused"``): the intra-chunk stage in one pass over K blocks with
[C, C] register accumulators (each row block as a masked [C, C] product).  Same outputs and numerics as
chunk_intra.py (see its docstring); kept in the config space because neither organisation wins everywhere
by a clear margin (docs/triton.md).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .gate import SPAN_MAX, chunk_beta, chunk_bounds, chunk_gamma, l2norm_factors
from .solve_tril import block_inverse, t_times_v


@triton.jit
def _chunk_intra_fused_kernel(
    q, k, v, g, beta, A_log, dt_bias, aqk, w, u, qg, kg, gl, scratch, chunk_seq, chunk_pos, cu, scale, lower_bound,
    # task config
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    L2NORM: tl.constexpr, USE_GATE: tl.constexpr, USE_LB: tl.constexpr, HAS_A: tl.constexpr,
    HAS_BIAS: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr,
    # kernel config
    BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, SOLVE_PREC: tl.constexpr,
    SOLVE_DIAG: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    NB: tl.constexpr = C // 16
    SCRATCH: tl.constexpr = C * C + C * 16 + 2 * C * BK
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_kh = i_h // (HV // H)  # grouped value heads: key head of this value head
    t0, eos, last = chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C)
    base = scratch + (i_c.to(tl.int64) * HV + i_h) * SCRATCH

    o_c = tl.arange(0, C)
    o_t = t0 + o_c
    m_t = o_t < eos
    blk = o_c // 16
    b_beta = chunk_beta(beta, o_t, m_t, i_h, HV, BETA_SIGMOID, BETA_SCALE)
    # fused L2 norm: per-row factors first (one extra read of the chunk's q and k rows)
    r_q, r_k = l2norm_factors(q, k, o_t, m_t, i_kh, H, K, C, BK, L2NORM)

    b_akk = tl.zeros([C, C], dtype=tl.float32)
    b_aqk = tl.zeros([C, C], dtype=tl.float32)
    for i_k in tl.range(0, tl.cdiv(K, BK), num_stages=NUM_STAGES):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        p_qk = o_t[:, None] * (H * K) + i_kh * K + o_k[None, :]
        b_k = tl.load(k + p_qk, mask=m, other=0.0).to(tl.float32) * r_k[:, None]
        b_q = tl.load(q + p_qk, mask=m, other=0.0).to(tl.float32) * r_q[:, None]
        b_g = chunk_gamma(g, A_log, dt_bias, lower_bound, o_t, m, i_h, o_k, m_k, HV, K, USE_GATE, USE_LB, HAS_A,
                          HAS_BIAS)
        b_gl = tl.sum(tl.where((o_t == last)[:, None], b_g, 0.0), 0)     # Gamma_C
        p_g = o_t[:, None] * (HV * K) + i_h * K + o_k[None, :]
        tl.store(qg + p_g, tl.where(m, b_q * tl.exp(b_g), 0.0).to(qg.dtype.element_ty), mask=m)
        tl.store(kg + p_g, tl.where(m, b_k * tl.exp(b_gl[None, :] - b_g), 0.0).to(kg.dtype.element_ty), mask=m)
        tl.store(gl + (i_c.to(tl.int64) * HV + i_h) * K + o_k, b_gl, mask=m_k)
        # Gamma at the middle row (16 i + 8) of each 16-row block, broadcast over the block's rows
        b_gref = tl.zeros([C, BK], dtype=tl.float32)
        for i in tl.static_range(NB):
            ref = tl.sum(tl.where((o_c == 16 * i + 8)[:, None], b_g, 0.0), 0)
            b_gref = tl.where((blk == i)[:, None], ref[None, :], b_gref)
        span = tl.max(tl.max(tl.where(m, tl.abs(b_gref - b_g), 0.0), 1), 0)   # largest |Gamma - ref|
        if span <= SPAN_MAX:
            # every row block (diagonal block included) as one tensor-core product around its middle row:
            # exp(Gamma_r - ref) <= exp(SPAN_MAX); exp(ref - Gamma_s) <= 1 before the block and
            # <= exp(SPAN_MAX) inside it.  Non-causal entries may overflow; they are masked by selection.
            e_r = tl.where(m, tl.exp(b_g - b_gref), 0.0)
            b_kr = b_k * e_r
            b_qr = b_q * e_r
            for i in tl.static_range(NB):
                ref = tl.sum(tl.where((o_c == 16 * i + 8)[:, None], b_g, 0.0), 0)
                e_s = tl.where((o_c < 16 * (i + 1))[:, None] & m, tl.exp(ref[None, :] - b_g), 0.0)
                b_ks = tl.trans(b_k * e_s)
                in_i = (blk == i)[:, None]
                b_akk += tl.dot(tl.where(in_i, b_kr, 0.0), b_ks, input_precision=DOT_PREC)
                b_aqk += tl.dot(tl.where(in_i, b_qr, 0.0), b_ks, input_precision=DOT_PREC)
        else:
            # strong decay (e.g. masked tokens): off-diagonal blocks around row 16 i (both factors <= 1),
            # diagonal blocks element-wise, one column of every diagonal block per step
            p_s = base + C * C + C * 16 + tl.arange(0, BK)[None, :]
            tl.store(p_s + o_c[:, None] * BK, b_g)
            tl.store(p_s + C * BK + o_c[:, None] * BK, b_k)
            tl.debug_barrier()
            for i in tl.static_range(1, NB):
                live = t0 + 16 * i < eos  # block i has tokens (else every factor is masked to 0)
                ref = tl.sum(tl.where((o_c == 16 * i)[:, None], b_g, 0.0), 0)
                e_r = tl.where((blk == i)[:, None] & m, tl.exp(b_g - ref[None, :]), 0.0)
                e_s = tl.where((o_c < 16 * i)[:, None] & m & live, tl.exp(ref[None, :] - b_g), 0.0)
                b_ks = tl.trans(b_k * e_s)
                b_akk += tl.dot(b_k * e_r, b_ks, input_precision=DOT_PREC)
                b_aqk += tl.dot(b_q * e_r, b_ks, input_precision=DOT_PREC)
            for j in range(0, 16):
                o_s = blk * 16 + j
                m_s = (t0 + o_s) < eos
                b_gj = tl.load(p_s + o_s[:, None] * BK)
                b_kj = tl.load(p_s + C * BK + o_s[:, None] * BK)
                causal = ((o_c % 16) >= j) & m_t & m_s
                b_kd = b_kj * tl.where(causal[:, None] & m_k[None, :], tl.exp(b_g - b_gj), 0.0)
                sel = o_c[None, :] == o_s[:, None]
                b_akk += tl.where(sel, tl.sum(b_k * b_kd, 1)[:, None], 0.0)
                b_aqk += tl.where(sel, tl.sum(b_q * b_kd, 1)[:, None], 0.0)
            tl.debug_barrier()

    valid = m_t[:, None] & m_t[None, :]
    b_akk = tl.where((o_c[:, None] > o_c[None, :]) & valid, b_akk * b_beta[:, None], 0.0)
    b_aqk = tl.where((o_c[:, None] >= o_c[None, :]) & valid, b_aqk * scale, 0.0)
    tl.store(aqk + o_t[:, None] * (HV * C) + i_h * C + o_c[None, :], b_aqk.to(aqk.dtype.element_ty),
             mask=m_t[:, None])

    # ---- blocked inverse of the unit lower-triangular I + A_kk
    tl.store(base + o_c[:, None] * C + o_c[None, :], b_akk)
    tl.debug_barrier()
    b_m = block_inverse(base, b_beta, C, SOLVE_PREC, SOLVE_DIAG)

    # ---- W = T (k * exp(Gamma)), U = T v
    for i_k in tl.range(0, tl.cdiv(K, BK), num_stages=NUM_STAGES):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        b_k = tl.load(k + o_t[:, None] * (H * K) + i_kh * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        b_g = chunk_gamma(g, A_log, dt_bias, lower_bound, o_t, m, i_h, o_k, m_k, HV, K, USE_GATE, USE_LB, HAS_A,
                          HAS_BIAS)
        b_w = tl.dot(b_m, tl.where(m, b_k * r_k[:, None] * tl.exp(b_g), 0.0), input_precision=DOT_PREC)
        tl.store(w + o_t[:, None] * (HV * K) + i_h * K + o_k[None, :], b_w.to(w.dtype.element_ty), mask=m)
    t_times_v(b_m, v, u, o_t, m_t, i_h, HV, V, BV, DOT_PREC, NUM_STAGES)
