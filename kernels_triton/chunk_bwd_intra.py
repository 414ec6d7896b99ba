"""Stage 3 of the Triton backward: dq, dk and the gate gradient of every chunk (docs/algorithm.md, "The chunkwise backward",
sections 2, 4, 5 and the gate of 6).

One program per (K block, chunk, value head); the K channels never mix here, except in beta's row term,
which is written per K block and summed by the prologue stage.

1. inter-chunk terms, one V block at a time: d(qg) = scale dO h^T, d(kg) = V_new dhn^T, d(ke) = -dv h^T and
   rowsum(h * dhn) for the gradient of Gamma_C;
2. intra-chunk terms from P (gradient of A_qk / scale) and Abar (gradient of A_kk), both from the solve stage:
   Gq = sum_s P E k_s, Gk = sum_s Abar E k_s (row side), Hc = sum_r (P q_r + beta_r Abar k_r) E (column side).
   Off-diagonal 16-row blocks are one product each, factored around the block's first row f = 16 i:
   exp(Gamma_r - Gamma_f) exp(Gamma_f - Gamma_s), both factors <= 1 and depending on tokens up to row r only
   (causal bit for bit).  The 16x16 diagonal tiles go element-wise (one column offset per step, all tiles at
   once, every exponent <= 0), which keeps gates down to -1000 exact;
3. dGamma, its reverse cumulative sum inside the chunk (dg of the log decay), and with the gate in the
   kernel the gate's backward: dg of the raw gate, and per-chunk partial sums of dA_log and ddt_bias
   (reduced in a fixed order on the host: deterministic).
Outputs dq and dk are per value head and float32 (gradients of the L2-normalised q, k); the prologue stage sums
the groups and applies the L2 norm's backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gate import chunk_beta, chunk_bounds, interpreting, l2norm_factors, mm


def get_configs() -> list[dict]:
    """Search space of this stage (a product, searched knob by knob): K and V slices, warps."""
    return [{"bwd_intra_BK": bk, "bwd_intra_BV": bv, "bwd_intra_warps": w}
            for bk in (16, 32, 64) for bv in (32, 64) for w in (4, 8)]


@triton.jit
def _gather(x, idx, C: tl.constexpr):
    """``x[idx]`` for a register vector ``x [C]`` and indices ``idx [C]`` (a masked reduction)."""
    o_c = tl.arange(0, C)
    return tl.sum(tl.where(o_c[None, :] == idx[:, None], x[None, :], 0.0), 1)


@triton.jit
def _gate_bwd(dgl, g, A_log, dt_bias, lower_bound, p_g, m, i_h, o_k, m_k, K: tl.constexpr, USE_LB: tl.constexpr,
              HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``(dx, dA_log terms)`` of the gate (gate.gate_value) for the log-decay gradient ``dgl``, raw gate at ``p_g``."""
    x = tl.load(g + p_g, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(dt_bias + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)[None, :]
    a = 1.0
    if HAS_A:
        a = tl.exp(tl.load(A_log + i_h).to(tl.float32))
    if USE_LB:
        y = x * a
        s = tl.sigmoid(y)
        dy = dgl * lower_bound * s * (1.0 - s)
        dx = dy * a
        da = dy * y
    else:
        slope = tl.where(x > 20.0, 1.0, tl.sigmoid(x))           # softplus is linear above 20
        dx = -dgl * a * slope
        da = dgl * (-a) * tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
    return tl.where(m, dx, 0.0), tl.where(m, da, 0.0)


@triton.jit
def kda_bwd_intra_kernel(
    q, k, g, beta, A_log, dt_bias, do, v_new, dv, h, dhn, gamma, gc, d_aqk, d_akk,
    dq, dk, dg, dbeta_part, dA_part, ddt_part, chunk_seq, chunk_pos, cu, scale, lower_bound, s_gc, s_gh, s_gr, TT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    L2NORM: tl.constexpr, USE_GATE: tl.constexpr, USE_LB: tl.constexpr, HAS_A: tl.constexpr,
    HAS_BIAS: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
):
    i_kb, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_kh = i_h // (HV // H)
    t0, eos, last = chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C)
    o_c = tl.arange(0, C)
    o_t = t0 + o_c
    m_t = o_t < eos
    blk = o_c // 16
    o_k = i_kb * BK + tl.arange(0, BK)
    m_k = o_k < K
    m = m_t[:, None] & m_k[None, :]
    i_ch = i_c.to(tl.int64) * HV + i_h
    r_q, r_k = l2norm_factors(q, k, o_t, m_t, i_kh, H, K, C, BK, L2NORM)
    b_beta = chunk_beta(beta, o_t, m_t, i_h, HV, BETA_SIGMOID, BETA_SCALE)
    p_gam = gamma + i_c.to(tl.int64) * s_gc + i_h * s_gh
    b_g = tl.load(p_gam + o_c[:, None] * s_gr + o_k[None, :], mask=m, other=0.0)
    b_gc = tl.load(gc + i_ch * K + o_k, mask=m_k, other=0.0)
    p_qk = o_t[:, None] * (H * K) + i_kh * K + o_k[None, :]
    b_q = tl.load(q + p_qk, mask=m, other=0.0).to(tl.float32) * r_q[:, None]
    b_k = tl.load(k + p_qk, mask=m, other=0.0).to(tl.float32) * r_k[:, None]

    # 1. inter-chunk terms
    b_dqg = tl.zeros([C, BK], dtype=tl.float32)
    b_dkg = tl.zeros([C, BK], dtype=tl.float32)
    b_dke = tl.zeros([C, BK], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        p_v = o_t[:, None] * (HV * V) + i_h * V + o_v[None, :]
        p_s = i_ch * (K * V) + o_k[:, None] * V + o_v[None, :]
        b_h = tl.load(h + p_s, mask=m_kv, other=0.0).to(tl.float32)
        b_dh = tl.load(dhn + p_s, mask=m_kv, other=0.0).to(tl.float32)
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_vn = tl.load(v_new + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_dv = tl.load(dv + p_v, mask=m_tv, other=0.0)
        b_dqg += mm(b_do, tl.trans(b_h), INTERPRET, PREC)
        b_dkg += mm(b_vn, tl.trans(b_dh), INTERPRET, PREC)
        b_dke -= mm(b_dv, tl.trans(b_h), INTERPRET, PREC)
        b_hdh += tl.sum(b_h * b_dh, 1)
    e_g = tl.where(m, tl.exp(b_g), 0.0)                    # exp(Gamma) <= 1
    e_c = tl.where(m, tl.exp(b_gc[None, :] - b_g), 0.0)    # exp(Gamma_C - Gamma) <= 1
    b_dqg *= scale
    b_dq = b_dqg * e_g
    b_dk = b_dkg * e_c + b_dke * e_g
    b_dG = b_dqg * b_q * e_g - b_dkg * b_k * e_c + b_dke * b_k * e_g
    b_dgc = tl.exp(b_gc) * b_hdh + tl.sum(b_dkg * b_k * e_c, 0)

    # 2. intra-chunk terms
    p_a = o_t[:, None] * (HV * C) + i_h * C + o_c[None, :]
    b_p = tl.load(d_aqk + p_a, mask=m_t[:, None], other=0.0)
    b_ab = tl.load(d_akk + p_a, mask=m_t[:, None], other=0.0)
    b_bk = b_k * b_beta[:, None]
    b_gq = tl.zeros([C, BK], dtype=tl.float32)
    b_gk = tl.zeros([C, BK], dtype=tl.float32)
    b_hc = tl.zeros([C, BK], dtype=tl.float32)
    for i in tl.static_range(1, C // 16):  # off-diagonal: row block i against the columns s < 16 i
        b_f = tl.load(p_gam + (16 * i) * s_gr + o_k, mask=m_k, other=0.0)
        e_r = tl.where(((blk == i) & m_t)[:, None] & m_k[None, :], tl.exp(b_g - b_f[None, :]), 0.0)
        e_s = tl.where(((o_c < 16 * i) & m_t)[:, None] & m_k[None, :], tl.exp(b_f[None, :] - b_g), 0.0)
        b_ks = b_k * e_s
        b_gq += e_r * mm(b_p, b_ks, INTERPRET, PREC)
        b_gk += e_r * mm(b_ab, b_ks, INTERPRET, PREC)
        b_hc += e_s * (mm(tl.trans(b_p), b_q * e_r, INTERPRET, PREC) + mm(tl.trans(b_ab), b_bk * e_r, INTERPRET, PREC))
    for j in range(0, 16):  # diagonal tiles, element-wise: column offset j of every tile at once
        # row side: row r against column s = 16 blk(r) + j <= r
        o_s = blk * 16 + j
        m_rs = ((o_c % 16) >= j) & m_t
        m2 = m_rs[:, None] & m_k[None, :]
        b_gs = tl.load(p_gam + o_s[:, None] * s_gr + o_k[None, :], mask=m2, other=0.0)
        b_ks = tl.load(k + (t0 + o_s)[:, None] * (H * K) + i_kh * K + o_k[None, :], mask=m2, other=0.0)
        b_ks = b_ks.to(tl.float32) * _gather(r_k, o_s, C)[:, None] * tl.where(m2, tl.exp(b_g - b_gs), 0.0)
        b_prs = tl.load(d_aqk + o_t * (HV * C) + i_h * C + o_s, mask=m_rs, other=0.0)
        b_ars = tl.load(d_akk + o_t * (HV * C) + i_h * C + o_s, mask=m_rs, other=0.0)
        b_gq += b_prs[:, None] * b_ks
        b_gk += b_ars[:, None] * b_ks
        # column side: column s against row r = 16 blk(s) + j >= s
        o_r = blk * 16 + j
        t_r = t0 + o_r
        m_sr = ((o_c % 16) <= j) & (t_r < eos)
        m2 = m_sr[:, None] & m_k[None, :]
        b_gr = tl.load(p_gam + o_r[:, None] * s_gr + o_k[None, :], mask=m2, other=0.0)
        e_rs = tl.where(m2, tl.exp(b_gr - b_g), 0.0)
        p_r = t_r[:, None] * (H * K) + i_kh * K + o_k[None, :]
        b_qr = tl.load(q + p_r, mask=m2, other=0.0).to(tl.float32) * _gather(r_q, o_r, C)[:, None]
        b_kr = tl.load(k + p_r, mask=m2, other=0.0).to(tl.float32) * _gather(r_k * b_beta, o_r, C)[:, None]
        b_psr = tl.load(d_aqk + t_r * (HV * C) + i_h * C + o_c, mask=m_sr, other=0.0)
        b_asr = tl.load(d_akk + t_r * (HV * C) + i_h * C + o_c, mask=m_sr, other=0.0)
        b_hc += (b_psr[:, None] * b_qr + b_asr[:, None] * b_kr) * e_rs
    b_dq += b_gq
    b_dk += b_gk * b_beta[:, None] + b_hc
    tl.store(dbeta_part + i_kb.to(tl.int64) * TT * HV + o_t * HV + i_h, tl.sum(b_k * b_gk, 1), mask=m_t)
    b_dG += b_q * b_gq + b_bk * b_gk - b_k * b_hc

    # 3. gate: Gamma_C is Gamma at the last valid row; reverse cumulative sum inside the chunk
    b_dG += tl.where((o_c == last - t0)[:, None], b_dgc[None, :], 0.0)
    b_dgl = tl.cumsum(tl.where(m, b_dG, 0.0), 0, reverse=True)
    p_o = o_t[:, None] * (HV * K) + i_h * K + o_k[None, :]
    if USE_GATE:
        b_dx, b_da = _gate_bwd(b_dgl, g, A_log, dt_bias, lower_bound, p_o, m, i_h, o_k, m_k, K, USE_LB, HAS_A,
                               HAS_BIAS)
        tl.store(dg + p_o, b_dx.to(dg.dtype.element_ty), mask=m)
        tl.store(ddt_part + i_ch * K + o_k, tl.sum(b_dx, 0), mask=m_k)
        tl.store(dA_part + i_ch * K + o_k, tl.sum(b_da, 0), mask=m_k)
    else:
        tl.store(dg + p_o, b_dgl.to(dg.dtype.element_ty), mask=m)
    tl.store(dq + p_o, b_dq, mask=m)
    tl.store(dk + p_o, b_dk, mask=m)


def chunk_bwd_intra(q, k, g, beta, A_log, dt_bias, do, fwd, dv, dhn, d_aqk, d_akk, opts, table, cfg):
    """Run the stage on flat tensors.  Returns ``(dq, dk [TT, HV, K] float32 per value head, dg [TT, HV, K] in g's
    dtype, dbeta_part [K blocks, TT, HV], dA_part, ddt_part [chunks, HV, K] (float32, None without the gate))``."""
    TT, H, K = q.shape
    HV, V = dv.shape[1], dv.shape[2]
    C, NC = table.chunk_size, table.num_chunks
    dev = q.device
    BK = min(cfg.bwd_intra_BK, triton.next_power_of_2(K))
    NKB = triton.cdiv(K, BK)
    dq = torch.empty(TT, HV, K, device=dev, dtype=torch.float32)
    dk = torch.empty(TT, HV, K, device=dev, dtype=torch.float32)
    dg = torch.empty(TT, HV, K, device=dev, dtype=g.dtype)
    dbeta_part = torch.empty(NKB, TT, HV, device=dev, dtype=torch.float32)
    use_gate = opts.use_gate_in_kernel
    dA_part = torch.empty(NC, HV, K, device=dev, dtype=torch.float32) if use_gate else None
    ddt_part = torch.empty(NC, HV, K, device=dev, dtype=torch.float32) if use_gate else None
    gamma = fwd.gamma
    if NC:
        kda_bwd_intra_kernel[(NKB, NC, HV)](
            q, k, g, beta, A_log if A_log is not None else g, dt_bias if dt_bias is not None else g, do,
            fwd.v_new, dv, fwd.h, dhn, gamma, fwd.gc, d_aqk, d_akk, dq, dk, dg, dbeta_part,
            dA_part if use_gate else dq, ddt_part if use_gate else dq, table.chunk_seq, table.chunk_pos, table.cu,
            float(opts.scale), float(opts.lower_bound) if opts.lower_bound is not None else 0.0,
            gamma.stride(0), gamma.stride(1), gamma.stride(2), TT,
            H=H, HV=HV, K=K, V=V, C=C, L2NORM=opts.use_qk_l2norm_in_kernel, USE_GATE=use_gate,
            USE_LB=use_gate and opts.lower_bound is not None, HAS_A=use_gate and A_log is not None,
            HAS_BIAS=use_gate and dt_bias is not None, BETA_SIGMOID=opts.use_beta_sigmoid_in_kernel,
            BETA_SCALE=2.0 if opts.allow_neg_eigval else 1.0,
            BK=BK, BV=min(cfg.bwd_intra_BV, triton.next_power_of_2(V)), INTERPRET=interpreting(),
            PREC=cfg.forward.precision, num_warps=cfg.bwd_intra_warps)
    return dq, dk, dg, dbeta_part, dA_part, ddt_part
