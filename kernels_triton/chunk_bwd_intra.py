"""Stage 3 of the Triton backward: dq, dk and the gate gradient of every chunk (docs/algorithm.md, "The chunkwise
backward", sections 2, 4, 5 and the gate of 6).  One program per (K block, chunk, value head); the K channels
never mix here, except in beta's row term, which is written per K block and summed by the prologue stage.

The program walks the chunk's 16-row blocks from the last to the first, so that Gamma's reverse cumulative sum
carries from block to block.  The gradient of Gamma_C, exp(Gamma_C) rowsum(h * dhn) + sum_r d(kg)_r kg_r with
d(kg) = V_new dhn^T (operands exact in TF32, kg = k exp(Gamma_C - Gamma) in float32 outside the product: with kg
inside a TF32 product instead, dg's error doubled and dA_log's and ddt_bias's grew 6-15x on the CPU with TF32
emulated), reaches every row; it is summed on the walk from the walk's own d(kg) and added to the rows at the end
(step 4), over the float32 partial values the walk stored.  Per block (first row f):

1. inter-chunk terms of its rows, one V block at a time: d(qg) = scale dO h^T, d(kg) = V_new dhn^T, d(ke) = -dv h^T;
2. intra-chunk terms from P (gradient of A_qk / scale) and Abar (gradient of A_kk), from the solve stage, factored
   as in the forward's intra kernel (chunk_intra.py, "Numerics") around row f with the shift d:
   exp(Gamma_r - Gamma_s) = exp(Gamma_r - Gamma_f + d) exp(Gamma_f - d - Gamma_s).  Off the diagonal tile, one
   tensor-core product per term, the two sides sharing one exponent tile over the chunk:
   rows:    Gq = e_r (P[block, s < f] Ks),  Gk = e_r (Abar[block, s < f] Ks),  Ks = k exp(Gamma_f - d - Gamma_s);
   columns: Hc = e_s (P[r >= f + 16, block]^T Qr + Abar[r >= f + 16, block]^T Kr),
            Qr = q exp(Gamma_r - Gamma_f + d),  Kr = beta k exp(Gamma_r - Gamma_f + d);
   the 16 x 16 diagonal tile in four products of its own, at the precision of :func:`diag_precision`.  With the
   range check (log gate), a column of the block out of range (its Gamma, or an earlier row's of the block, further
   than SPAN_MAX from Gamma_f - d) is left out of the products and taken element-wise, every exponent <= 0: its
   row-side entries (rows r >= s of the block) and its column-side sum; the choice looks at rows up to s only, so
   the gradients stay causal bit for bit;
3. dGamma, its reverse cumulative sum plus what the later blocks carry (dg of the log decay, less Gamma_C's share),
   stored in float32;
4. after the walk, Gamma_C's share added to every row, and with the gate in the kernel the gate's backward: dg of
   the raw gate, and per-chunk partial sums of dA_log and ddt_bias (reduced in a fixed order on the host:
   deterministic).
dq and dk are per value head and float32 (gradients of the L2-normalised q, k); the prologue stage sums the groups
and applies the L2 norm's backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import chunk_bwd_solve as solve_stage
from .chunk_bwd_prologue import intra_writes_final
from .chunk_intra import factor_shift
from .gate import SPAN_MAX, chunk_beta, chunk_bounds, interpreting, l2norm_factors, mm


def diag_precision(precision: str) -> str:
    """Precision of the diagonal tiles' products (16 wide, the least decayed and largest terms): "tf32" is raised
    to "tf32x3", close to the float32 element-wise sums these products replaced; the tiles off the diagonal stay at
    the forward's precision."""
    return "tf32x3" if precision == "tf32" else precision


def get_configs() -> list[dict]:
    """Search space of this stage (a product, searched knob by knob): K and V slices, warps, pipelining depth of
    the V loop."""
    return [{"bwd_intra_BK": bk, "bwd_intra_BV": bv, "bwd_intra_warps": w, "bwd_intra_stages": st}
            for bk in (16, 32, 64) for bv in (32, 64) for w in (4, 8) for st in (1, 3)]


@triton.jit
def _norm_factors(n_x, t, m, H: tl.constexpr):
    """``[R]`` L2-norm factors of tokens ``t`` (int64, valid where ``m``) read back from the scratch at ``n_x`` (one
    key head's q or k column of a ``[TT, H, 2]`` float32 table)."""
    return tl.load(n_x + t * (2 * H), mask=m, other=1.0)


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
def _exact_rows(b_gi, b_f, shift, mi, CHECK: tl.constexpr):
    """``[16]`` mask of the block's rows (as columns of its diagonal tile) that leave the factored products: with
    ``CHECK``, those whose |Gamma - Gamma_f + d|, or an earlier row's of the block, exceeds SPAN_MAX."""
    o_16 = tl.arange(0, 16)
    if CHECK:
        out = tl.max(tl.where(mi, tl.abs(b_gi - b_f[None, :] + shift), 0.0), 1)
        return tl.max(tl.where(o_16[None, :] <= o_16[:, None], out[None, :], 0.0), 1) > SPAN_MAX
    else:
        return o_16 < 0


@triton.jit
def kda_bwd_intra_kernel(
    q, k, g, beta, A_log, dt_bias, do, v_new, dv, h, dhn, gamma, gc, d_aqk, d_akk, norms,
    dq, dk, dg, dgp, dbeta_part, dA_part, ddt_part, chunk_seq, chunk_pos, cu, scale, lower_bound, shift,
    s_gc, s_gh, s_gr, TT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    L2NORM: tl.constexpr, USE_GATE: tl.constexpr, USE_LB: tl.constexpr, HAS_A: tl.constexpr,
    HAS_BIAS: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr, DIAG_PREC: tl.constexpr,
    CHECK: tl.constexpr, STAGES: tl.constexpr,
):
    i_kb, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_kh = i_h // (HV // H)
    t0, eos, _ = chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C)
    o_c = tl.arange(0, C)
    o_t = t0 + o_c
    # the chunk's L2-norm factors, written once to the norms scratch ([TT, H, 2] float32: q's and k's) and read
    # back 16 rows at a time (every program of a key head writes the same values)
    n_q = norms + i_kh * 2
    n_k = n_q + 1
    if L2NORM:
        r_q, r_k = l2norm_factors(q, k, o_t, o_t < eos, i_kh, H, K, C, BK, L2NORM)
        tl.store(n_q + o_t * (2 * H), r_q, mask=o_t < eos)
        tl.store(n_k + o_t * (2 * H), r_k, mask=o_t < eos)
        tl.debug_barrier()
    # every pointer is a scalar base of the chunk (int64 arithmetic) plus 32-bit offsets inside it: 64-bit offset
    # tiles would hold two registers per element for the whole walk
    n_t = (eos - t0).to(tl.int32)                  # the chunk's valid rows
    i_ch = i_c.to(tl.int64) * HV + i_h
    q += t0 * (H * K) + i_kh * K
    k += t0 * (H * K) + i_kh * K
    do += t0 * (HV * V) + i_h * V
    v_new += t0 * (HV * V) + i_h * V
    dv += t0 * (HV * V) + i_h * V
    d_aqk += t0 * (HV * C) + i_h * C
    d_akk += t0 * (HV * C) + i_h * C
    h += i_ch * (K * V)
    dhn += i_ch * (K * V)
    gamma += i_c.to(tl.int64) * s_gc + i_h * s_gh
    g += t0 * (HV * K) + i_h * K
    dq += t0 * (HV * K) + i_h * K
    dk += t0 * (HV * K) + i_h * K
    dg += t0 * (HV * K) + i_h * K
    dgp += t0 * (HV * K) + i_h * K
    dbeta_part += i_kb.to(tl.int64) * TT * HV + t0 * HV + i_h
    o_16 = tl.arange(0, 16)
    o_k = i_kb * BK + tl.arange(0, BK)
    m_k = o_k < K
    b_gc = tl.load(gc + i_ch * K + o_k, mask=m_k, other=0.0)

    # d(Gamma_C) = exp(gc) rowsum(h * dhn) + sum_r d(kg)_r kg_r reaches every row's dGamma; it is summed on the walk
    # (d(kg) = V_new dhn^T is the walk's own product) and added to the rows after it (step 4)
    b_carry = tl.zeros([BK], dtype=tl.float32)     # what the later blocks' rows add to dGamma
    b_dgc = tl.zeros([BK], dtype=tl.float32)
    for i_b in range(0, C // 16):
        f = C - 16 - 16 * i_b                      # the block's first row, last block first
        o_i = f + o_16
        m_i = o_i < n_t
        mi = m_i[:, None] & m_k[None, :]
        p_i = o_i[:, None] * (H * K) + o_k[None, :]
        b_qi = tl.load(q + p_i, mask=mi, other=0.0).to(tl.float32)
        b_ki = tl.load(k + p_i, mask=mi, other=0.0).to(tl.float32)
        if L2NORM:
            b_qi *= _norm_factors(n_q, t0 + o_i, m_i, H)[:, None]
            b_ki *= _norm_factors(n_k, t0 + o_i, m_i, H)[:, None]
        b_bi = chunk_beta(beta, t0 + o_i, m_i, i_h, HV, BETA_SIGMOID, BETA_SCALE)
        b_gi = tl.load(gamma + o_i[:, None] * s_gr + o_k[None, :], mask=mi, other=0.0)
        b_f = tl.load(gamma + f * s_gr + o_k, mask=m_k, other=0.0)

        # 1. inter-chunk terms of the block's rows
        b_dqg = tl.zeros([16, BK], dtype=tl.float32)
        b_dkg = tl.zeros([16, BK], dtype=tl.float32)
        b_dke = tl.zeros([16, BK], dtype=tl.float32)
        for i_v in tl.range(0, tl.cdiv(V, BV), num_stages=STAGES):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            m_kv = m_k[:, None] & m_v[None, :]
            m_iv = m_i[:, None] & m_v[None, :]
            p_v = o_i[:, None] * (HV * V) + o_v[None, :]
            p_s = o_k[:, None] * V + o_v[None, :]
            b_h = tl.load(h + p_s, mask=m_kv, other=0.0).to(tl.float32)
            b_dh = tl.load(dhn + p_s, mask=m_kv, other=0.0).to(tl.float32)
            b_do = tl.load(do + p_v, mask=m_iv, other=0.0).to(tl.float32)
            b_vn = tl.load(v_new + p_v, mask=m_iv, other=0.0).to(tl.float32)
            b_dv = tl.load(dv + p_v, mask=m_iv, other=0.0)
            b_dqg += mm(b_do, tl.trans(b_h), INTERPRET, PREC)
            b_dkg += mm(b_vn, tl.trans(b_dh), INTERPRET, PREC)
            b_dke -= mm(b_dv, tl.trans(b_h), INTERPRET, PREC)
        b_dqg *= scale

        # 2. intra-chunk terms, factored around row f.  Off the diagonal tile, one 16-row block j at a time with
        # its own exponent tile: the columns s < f for the rows, the rows r >= f + 16 for the columns (no tile of
        # the whole chunk stays live); the diagonal tile is its own product, at DIAG_PREC, with the exact columns
        # left out.
        exact = _exact_rows(b_gi, b_f, shift, mi, CHECK)
        b_gq = tl.zeros([16, BK], dtype=tl.float32)
        b_gk = tl.zeros([16, BK], dtype=tl.float32)
        for j in tl.range(0, f // 16, num_stages=1):
            o_j = 16 * j + o_16
            m_j = o_j < n_t
            mj = m_j[:, None] & m_k[None, :]
            e_j = tl.exp(b_f[None, :] - shift - tl.load(gamma + o_j[:, None] * s_gr + o_k[None, :], mask=mj,
                                                        other=0.0))
            b_kj = tl.where(mj, tl.load(k + o_j[:, None] * (H * K) + o_k[None, :], mask=mj, other=0.0)
                            .to(tl.float32) * e_j, 0.0)
            if L2NORM:
                b_kj *= _norm_factors(n_k, t0 + o_j, m_j, H)[:, None]
            p_ij = o_i[:, None] * (HV * C) + o_j[None, :]
            m_ij = m_i[:, None] & m_j[None, :]
            b_gq += mm(tl.load(d_aqk + p_ij, mask=m_ij, other=0.0), b_kj, INTERPRET, PREC)
            b_gk += mm(tl.load(d_akk + p_ij, mask=m_ij, other=0.0), b_kj, INTERPRET, PREC)
        b_hc = tl.zeros([16, BK], dtype=tl.float32)
        for j in tl.range(f // 16 + 1, C // 16, num_stages=1):
            o_j = 16 * j + o_16
            m_j = o_j < n_t
            mj = m_j[:, None] & m_k[None, :]
            e_j = tl.where(mj, tl.exp(tl.load(gamma + o_j[:, None] * s_gr + o_k[None, :], mask=mj, other=0.0)
                                      - b_f[None, :] + shift), 0.0)
            p_j = o_j[:, None] * (H * K) + o_k[None, :]
            b_qj = tl.load(q + p_j, mask=mj, other=0.0).to(tl.float32) * e_j
            b_kj = tl.load(k + p_j, mask=mj, other=0.0).to(tl.float32) * e_j \
                * chunk_beta(beta, t0 + o_j, m_j, i_h, HV, BETA_SIGMOID, BETA_SCALE)[:, None]
            if L2NORM:
                b_qj *= _norm_factors(n_q, t0 + o_j, m_j, H)[:, None]
                b_kj *= _norm_factors(n_k, t0 + o_j, m_j, H)[:, None]
            p_ji = o_j[None, :] * (HV * C) + o_i[:, None]      # [s in block f, r in block j]: P[r, s] transposed
            m_ji = m_i[:, None] & m_j[None, :]
            b_hc += mm(tl.load(d_aqk + p_ji, mask=m_ji, other=0.0), b_qj, INTERPRET, PREC) \
                + mm(tl.load(d_akk + p_ji, mask=m_ji, other=0.0), b_kj, INTERPRET, PREC)
        # the diagonal tile: rows r = f + i, columns s = f + j
        e_r = tl.where(mi, tl.exp(b_gi - b_f[None, :] + shift), 0.0)           # <= exp(d)
        e_s = tl.where(mi & ~exact[:, None], tl.exp(b_f[None, :] - shift - b_gi), 0.0)
        p_d = o_i[:, None] * (HV * C) + o_i[None, :]
        b_pd = tl.load(d_aqk + p_d, mask=m_i[:, None], other=0.0)
        b_ad = tl.load(d_akk + p_d, mask=m_i[:, None], other=0.0)
        b_ks = b_ki * e_s
        b_gq = e_r * (b_gq + mm(b_pd, b_ks, INTERPRET, DIAG_PREC))
        b_gk = e_r * (b_gk + mm(b_ad, b_ks, INTERPRET, DIAG_PREC))
        b_hc += mm(tl.trans(b_pd), b_qi * e_r, INTERPRET, DIAG_PREC) \
            + mm(tl.trans(b_ad), b_ki * b_bi[:, None] * e_r, INTERPRET, DIAG_PREC)
        b_hc *= e_s
        if CHECK:
            if tl.max(exact.to(tl.int32), 0) > 0:  # rare (masked tokens, g ~ -1000): exact columns element-wise
                for j in range(0, 16):
                    s = f + j
                    x_s = (o_16 == j) & exact              # column s is exact
                    # as vectors over the channels (a scalar mask breaks the interpreter of newer Triton releases)
                    x_c = (o_k * 0 + tl.max(x_s.to(tl.int32), 0)) > 0
                    m_s = m_k & x_c & ((o_k * 0 + s) < n_t)
                    b_gs = tl.load(gamma + s * s_gr + o_k, mask=m_k, other=0.0)
                    b_kss = tl.load(k + s * (H * K) + o_k, mask=m_s, other=0.0).to(tl.float32)
                    if L2NORM:
                        b_kss *= tl.load(n_k + (t0 + s) * (2 * H), mask=s < n_t, other=1.0)  # unwritten past n_t
                    # its row-side entries: rows r >= s of the block
                    e_b = tl.where(((o_16 >= j) & m_i)[:, None] & m_s[None, :], tl.exp(b_gi - b_gs[None, :]), 0.0)
                    p_s = o_i * (HV * C) + s
                    b_gq += tl.load(d_aqk + p_s, mask=m_i, other=0.0)[:, None] * b_kss[None, :] * e_b
                    b_gk += tl.load(d_akk + p_s, mask=m_i, other=0.0)[:, None] * b_kss[None, :] * e_b
                    # its column-side sum: every row r >= s of the chunk, 16 rows at a time (this path's tiles
                    # stay block-sized, so they do not raise the kernel's register peak)
                    b_sum = tl.zeros([BK], dtype=tl.float32)
                    for i_r in range(f // 16, C // 16):
                        o_r = i_r * 16 + o_16
                        m_r = o_r < n_t
                        mr = m_r[:, None] & m_k[None, :]
                        p_r = o_r[:, None] * (H * K) + o_k[None, :]
                        e_c = tl.where(((o_r >= s) & m_r)[:, None] & m_s[None, :],
                                       tl.exp(tl.load(gamma + o_r[:, None] * s_gr + o_k[None, :], mask=mr, other=0.0)
                                              - b_gs[None, :]), 0.0)
                        p_sc = o_r * (HV * C) + s
                        b_qr = tl.load(q + p_r, mask=mr, other=0.0).to(tl.float32)
                        b_kr = tl.load(k + p_r, mask=mr, other=0.0).to(tl.float32) \
                            * chunk_beta(beta, t0 + o_r, m_r, i_h, HV, BETA_SIGMOID, BETA_SCALE)[:, None]
                        if L2NORM:
                            b_qr *= _norm_factors(n_q, t0 + o_r, m_r, H)[:, None]
                            b_kr *= _norm_factors(n_k, t0 + o_r, m_r, H)[:, None]
                        b_col = tl.load(d_aqk + p_sc, mask=m_r, other=0.0)[:, None] * b_qr \
                            + tl.load(d_akk + p_sc, mask=m_r, other=0.0)[:, None] * b_kr
                        b_sum += tl.sum(b_col * e_c, 0)
                    b_hc += tl.where(x_s[:, None], b_sum[None, :], 0.0)

        # 3. the block's outputs; dGamma's reverse cumulative sum continues from the later rows
        e_g = tl.where(mi, tl.exp(b_gi), 0.0)                    # exp(Gamma) <= 1
        e_c = tl.where(mi, tl.exp(b_gc[None, :] - b_gi), 0.0)    # exp(Gamma_C - Gamma) <= 1
        b_dq = b_dqg * e_g + b_gq
        b_dk = b_dkg * e_c + b_dke * e_g + b_gk * b_bi[:, None] + b_hc
        b_dG = b_qi * b_dq + b_ki * (b_dke * e_g - b_dkg * e_c + b_bi[:, None] * b_gk - b_hc)
        b_dG = tl.where(mi, b_dG, 0.0)
        b_dgl = tl.cumsum(b_dG, 0, reverse=True) + b_carry[None, :]    # without d(Gamma_C) yet
        b_carry += tl.sum(b_dG, 0)
        b_dgc += tl.sum(b_dkg * b_ki * e_c, 0)                    # d(kg) kg, kg = k exp(gc - Gamma)
        tl.store(dbeta_part + o_i * HV, tl.sum(b_ki * b_gk, 1), mask=m_i)
        p_o = o_i[:, None] * (HV * K) + o_k[None, :]
        tl.store(dgp + p_o, b_dgl, mask=mi)
        # + 0.0 turns -0.0 into +0.0, as the prologue's sum from zeros does when it takes them over
        tl.store(dq + p_o, b_dq + 0.0, mask=mi)
        tl.store(dk + p_o, b_dk + 0.0, mask=mi)

    # 4. d(Gamma_C) complete: exp(gc) rowsum(h * dhn) joins it, then every row of the chunk gets it, over the
    # float32 partial values the walk stored, and with the gate in the kernel the gate's backward runs on the sum
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_kv = m_k[:, None] & (o_v < V)[None, :]
        b_hdh += tl.sum(tl.load(h + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)
                        * tl.load(dhn + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32), 1)
    b_dgc += tl.exp(b_gc) * b_hdh
    b_fix = tl.zeros([16, BK], dtype=tl.float32) + b_dgc[None, :]
    b_sdx = tl.zeros([BK], dtype=tl.float32)       # the chunk's sums of the gate's dt_bias and A_log terms
    b_sda = tl.zeros([BK], dtype=tl.float32)
    tl.debug_barrier()   # the partial values are read back by other threads of the program
    for i_b in range(0, C // 16):
        o_i = 16 * i_b + o_16
        mi = (o_i < n_t)[:, None] & m_k[None, :]
        p_o = o_i[:, None] * (HV * K) + o_k[None, :]
        b_dgl = tl.load(dgp + p_o, mask=mi, other=0.0) + b_fix
        if USE_GATE:
            b_dx, b_da = _gate_bwd(b_dgl, g, A_log, dt_bias, lower_bound, p_o, mi, i_h, o_k, m_k, K, USE_LB, HAS_A,
                                   HAS_BIAS)
            tl.store(dg + p_o, b_dx.to(dg.dtype.element_ty), mask=mi)
            b_sdx += tl.sum(b_dx, 0)
            b_sda += tl.sum(b_da, 0)
        else:
            tl.store(dg + p_o, b_dgl.to(dg.dtype.element_ty), mask=mi)
    if USE_GATE:
        tl.store(ddt_part + i_ch * K + o_k, b_sdx, mask=m_k)
        tl.store(dA_part + i_ch * K + o_k, b_sda, mask=m_k)


def chunk_bwd_intra(q, k, g, beta, A_log, dt_bias, do, fwd, dv, dhn, d_aqk, d_akk, opts, table, cfg):
    """Run the stage on flat tensors.  Returns ``(dq, dk [TT, HV, K] float32 per value head (in q's / k's dtype and
    final when HV == H without the L2 norm in the kernel), dg [TT, HV, K] in g's dtype, dbeta_part [K blocks, TT,
    HV], dA_part, ddt_part [chunks, HV, K] (float32, None without the gate))``."""
    TT, H, K = q.shape
    HV, V = dv.shape[1], dv.shape[2]
    C, NC = table.chunk_size, table.num_chunks
    dev = q.device
    BK = min(cfg.bwd_intra_BK, triton.next_power_of_2(K))
    NKB = triton.cdiv(K, BK)
    # with one value head per key head and no L2 norm in the kernel, dq and dk are final here: written in q's / k's
    # dtype (the same rounding as the prologue's cast), else float32 per value head for the prologue
    final = intra_writes_final(H, HV, opts)
    dq = torch.empty(TT, HV, K, device=dev, dtype=q.dtype if final else torch.float32)
    dk = torch.empty(TT, HV, K, device=dev, dtype=k.dtype if final else torch.float32)
    dg = torch.empty(TT, HV, K, device=dev, dtype=g.dtype)
    # dGamma before d(Gamma_C)'s share, float32: in dg itself when g is float32 (an extra buffer for bf16 or fp16 g)
    dg_part = dg if g.dtype == torch.float32 else torch.empty(TT, HV, K, device=dev, dtype=torch.float32)
    dbeta_part = torch.empty(NKB, TT, HV, device=dev, dtype=torch.float32)
    use_gate = opts.use_gate_in_kernel
    use_lb = use_gate and opts.lower_bound is not None
    dA_part = torch.empty(NC, HV, K, device=dev, dtype=torch.float32) if use_gate else None
    ddt_part = torch.empty(NC, HV, K, device=dev, dtype=torch.float32) if use_gate else None
    gamma = fwd.gamma
    norms = solve_stage.new_output(TT, H, 2, device=dev) if opts.use_qk_l2norm_in_kernel else dq
    lower_bound = float(opts.lower_bound) if use_lb else 0.0
    shift, check = factor_shift(use_lb, lower_bound)   # the forward's factoring, so the same gates need no check
    if NC:
        kda_bwd_intra_kernel[(NKB, NC, HV)](
            q, k, g, beta, A_log if A_log is not None else g, dt_bias if dt_bias is not None else g, do,
            fwd.v_new, dv, fwd.h, dhn, gamma, fwd.gc, d_aqk, d_akk, norms, dq, dk, dg, dg_part, dbeta_part,
            dA_part if use_gate else dq, ddt_part if use_gate else dq, table.chunk_seq, table.chunk_pos, table.cu,
            float(opts.scale), lower_bound, shift, gamma.stride(0), gamma.stride(1), gamma.stride(2), TT,
            H=H, HV=HV, K=K, V=V, C=C, L2NORM=opts.use_qk_l2norm_in_kernel, USE_GATE=use_gate,
            USE_LB=use_lb, HAS_A=use_gate and A_log is not None,
            HAS_BIAS=use_gate and dt_bias is not None, BETA_SIGMOID=opts.use_beta_sigmoid_in_kernel,
            BETA_SCALE=2.0 if opts.allow_neg_eigval else 1.0,
            BK=BK, BV=min(cfg.bwd_intra_BV, triton.next_power_of_2(V)), INTERPRET=interpreting(),
            PREC=cfg.forward.precision, DIAG_PREC=diag_precision(cfg.forward.precision), CHECK=check,
            STAGES=cfg.bwd_intra_stages,
            num_warps=cfg.bwd_intra_warps)
    return dq, dk, dg, dbeta_part, dA_part, ddt_part
