"""The fused organisation of the Triton chunkwise forward: every stage of docs/algorithm.md in one kernel.

``kda_fused_kernel``: one program per (V block, sequence, value head) walks its sequence's chunks in order.  Its
running ``[K, BV]`` float32 state tile lives in its own tile of the final-state buffer ``ht`` (written once per
chunk, read back from L1/L2 by the same program; nothing else touches it).  Per chunk it computes, without writing
any other intermediate to memory:

    prologues   q/k L2 norm, the gate (safe gate / lower bound), beta's sigmoid (gate.py helpers)
    Gamma       chunk-local cumulative sum of the log decay, gc = Gamma at the chunk's last row
    A_kk, A_qk  one tensor-core product per 16-row block, factored around the block's first row (below)
    T           = (I + A_kk)^-1 diag(beta)   (solve_tril.block_inverse_registers: the staged method, in registers)
    W, U        = T (k exp(Gamma)),  T v[:, V block]
    V_new       = U - W S
    O           = scale (q exp(Gamma)) S + aqk V_new
    S           = diag(exp(gc)) S + (k exp(gc - Gamma))^T V_new

Everything over the K channels goes K slice by K slice (``K_SLICE`` channels): the A products and the rows'
squared norms are summed over slices (q, k and Gamma of one slice loaded and computed at a time), then W S and
qg S are summed over slices against the matching rows of S, then the state is updated slice by slice.  Each pass
reloads q, k, g of its slice (from L1/L2) and recomputes the gate and Gamma rather than keeping ``[C, K]`` tiles:
only ``[C, K_SLICE]`` tiles, the ``[C, C]`` products and ``[C, BV]`` blocks are live at once (register counts in
docs/triton.md).  The V blocks of one (sequence, head) each repeat the intra part (A, T, W), as the TileLang fused
kernel does.

Numerics are those of the staged intra kernel (chunk_intra.py): entry (r, s) of a 16-row block's product is
``x_r exp(Gamma_r - Gamma_f + d) . k_s exp(Gamma_f - d - Gamma_s)`` with f the block's first row, so it reads
only tokens up to max(r, s) (causal bit for bit); the safe gate with |lower_bound| <= SAFE_BOUND centres the
range with ``d = -7.5 lower_bound`` and checks nothing, any other gate uses ``d = SPAN_MAX / 2`` and rows out of
range take their diagonal tile element-wise (every exponent <= 0).  Gates are floored at G_FLOOR; non-finite
entries of A_kk and of ``k exp(Gamma)`` are zeroed before the dense products.  The rows' L2 norm factors (float32)
multiply A after the products, as in the staged kernels, and q, k before W, qg and kg.  Intermediates are rounded
where the staged forward stores them (W, U, aqk, V_new, qg, kg in the input dtype), so both organisations compute
the same function with a similar error; their bits differ.

Not covered (the staged organisation runs instead, :func:`fused_reason`): the states entering each chunk
(``return_intermediate_states``), which the fused kernel never writes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_intra import factor_shift
from .chunk_state import state_block_v
from .gate import (L2NORM_EPS, SPAN_MAX, chunk_beta, chunk_gamma, finite_or_zero, interpreting, mm, state_tile,
                   state_walk_program)
from .solve_tril import block_inverse_registers

BLOCK = tl.constexpr(16)   # row block of the A products and diagonal block of the inverse
K_SLICE = 16               # channels of q, k and Gamma live at once (one K slice)


def get_configs() -> list[dict]:
    """The fused organisation's part of the search space (not measured on a GPU yet): one entry, the fused kernel
    at its defaults (the V block chosen per call, 8 warps).  Its ``fused_BV`` and ``fused_warps`` are left to
    explicit configs until a GPU measurement says which alternatives are worth a place in the tuner's budget."""
    return [{"organisation": "fused"}]


def fused_reason(return_states: bool) -> str | None:
    """Why the fused organisation cannot run a forward (the staged one runs it instead), or None."""
    if return_states:
        return "the fused kernel never writes the states entering each chunk (return_intermediate_states)"
    return None


# ------------------------------------------------------------------------------------------------- helpers

@triton.jit
def row_block(x3, b, NB: tl.constexpr):
    """Row block ``b`` (``[16, BK]``) of ``x3 [NB, 16, BK]``, by selection (other blocks never enter the sum)."""
    return tl.sum(tl.where(tl.arange(0, NB)[:, None, None] == b, x3, 0.0), 0)


@triton.jit
def block_rows_j(x, j, C: tl.constexpr, BK: tl.constexpr):
    """``[C, BK]``: row r holds row ``16 (r // 16) + j`` of ``x [C, BK]`` (row j of r's own block)."""
    NB: tl.constexpr = C // BLOCK
    x3 = tl.reshape(x, (NB, BLOCK, BK))
    rows = tl.sum(tl.where(tl.arange(0, BLOCK)[None, :, None] == j, x3, 0.0), 1)      # [NB, BK]
    return tl.reshape(tl.broadcast_to(rows[:, None, :], (NB, BLOCK, BK)), (C, BK))


@triton.jit
def diag_tiles_elementwise(b_q, b_k, b_g, m_t, m_k, d_kk, d_qk, C: tl.constexpr, KS: tl.constexpr):
    """``d_kk, d_qk`` plus one K slice's share of the diagonal 16x16 tiles of ``sum_c x_r[c] exp(Gamma_r[c] -
    Gamma_s[c]) k_s[c]`` for x = k and x = q (``[C, C]``, zeros off the diagonal tiles), element-wise: one column
    of every tile per step, every exponent <= 0."""
    o_c = tl.arange(0, C)
    for j in range(0, BLOCK):
        b_kj = block_rows_j(b_k, j, C, KS)
        b_gj = block_rows_j(b_g, j, C, KS)
        causal = ((o_c % BLOCK) >= j) & m_t
        b_kd = b_kj * tl.where(causal[:, None] & m_k[None, :], tl.exp(b_g - b_gj), 0.0)
        sel = o_c[None, :] == ((o_c // BLOCK) * BLOCK + j)[:, None]
        d_kk = tl.where(sel, d_kk + tl.sum(b_k * b_kd, 1)[:, None], d_kk)
        d_qk = tl.where(sel, d_qk + tl.sum(b_q * b_kd, 1)[:, None], d_qk)
    return d_kk, d_qk


@triton.jit
def chunk_slice(q, k, g, A_log, dt_bias, lower_bound, o_t, m_t, i_kh, i_h, o_k, m_k,
                H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, USE_GATE: tl.constexpr, USE_LB: tl.constexpr,
                HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """q, k (float32, not normalised) and Gamma of the chunk's rows ``o_t`` and channels ``o_k`` (``[C, len(o_k)]``,
    zeros where masked)."""
    m_tk = m_t[:, None] & m_k[None, :]
    p_qk = o_t[:, None] * (H * K) + i_kh * K + o_k[None, :]
    b_q = tl.load(q + p_qk, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_qk, mask=m_tk, other=0.0).to(tl.float32)
    b_g = chunk_gamma(g, A_log, dt_bias, lower_bound, o_t, m_tk, i_h, o_k, m_k, HV, K, USE_GATE, USE_LB, HAS_A,
                      HAS_BIAS)
    return b_q, b_k, b_g


@triton.jit
def slice_products(b_q, b_k, b_g, m_t, m_k, shift, akk3, aqk3, C: tl.constexpr, KS: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """``akk3, aqk3 [C/16, 16, C]`` plus one K slice's share of the raw products ``sum_c x_r[c] exp(Gamma_r[c] -
    Gamma_s[c]) k_s[c]`` (x = k, q): row block i is one product factored around its first row f with shift d."""
    NB: tl.constexpr = C // BLOCK
    o_c = tl.arange(0, C)
    m_tk = m_t[:, None] & m_k[None, :]
    gf = tl.sum(tl.where(tl.arange(0, BLOCK)[None, :, None] == 0, tl.reshape(b_g, (NB, BLOCK, KS)), 0.0), 1)
    e_r = tl.where(m_tk, tl.exp(b_g - block_rows_j(b_g, 0, C, KS) + shift), 0.0)
    kr3 = tl.reshape(b_k * e_r, (NB, BLOCK, KS))
    qr3 = tl.reshape(b_q * e_r, (NB, BLOCK, KS))
    o_b = tl.arange(0, NB)[:, None, None]
    for i in tl.static_range(NB):
        b_f = tl.sum(tl.where(tl.arange(0, NB)[:, None] == i, gf, 0.0), 0)   # Gamma_f of block i, [KS]
        cols = m_t & (o_c < BLOCK * (i + 1))     # the columns of block i: rows s < 16 (i + 1)
        b_ks = tl.trans(b_k * tl.where(cols[:, None] & m_k[None, :], tl.exp(b_f[None, :] - shift - b_g), 0.0))
        akk3 += tl.where(o_b == i, tl.dot(row_block(kr3, i, NB), b_ks, input_precision=DOT_PREC)[None, :, :], 0.0)
        aqk3 += tl.where(o_b == i, tl.dot(row_block(qr3, i, NB), b_ks, input_precision=DOT_PREC)[None, :, :], 0.0)
    return akk3, aqk3


@triton.jit
def chunk_a(q, k, g, A_log, dt_bias, lower_bound, o_t, m_t, i_kh, i_h, shift,
            H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, C: tl.constexpr, KS: tl.constexpr,
            USE_GATE: tl.constexpr, USE_LB: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
            L2NORM: tl.constexpr, CHECK: tl.constexpr, DOT_PREC: tl.constexpr):
    """``(A_kk, A_qk, rq, rk)``: the products ``sum_c x_r[c] exp(Gamma_r[c] - Gamma_s[c]) k_s[c]`` (x = k, q;
    ``[C, C]``, valid for s <= r, anything above the diagonal) of one chunk's normalised q and k, summed over K
    slices of ``KS`` channels (q, k, Gamma loaded per slice), and the rows' L2 norm factors (ones without
    ``L2NORM``), applied after the products.  With ``CHECK``, rows whose ``|Gamma - Gamma_f + d|`` (or an
    earlier row's of the block) exceeds SPAN_MAX take their diagonal tile element-wise."""
    NB: tl.constexpr = C // BLOCK
    o_c = tl.arange(0, C)
    akk3 = tl.zeros([NB, BLOCK, C], dtype=tl.float32)
    aqk3 = tl.zeros([NB, BLOCK, C], dtype=tl.float32)
    ss_q = tl.zeros([C], dtype=tl.float32)
    ss_k = tl.zeros([C], dtype=tl.float32)
    far = tl.zeros([C], dtype=tl.float32)
    for i_k in tl.range(0, tl.cdiv(K, KS), num_stages=1):
        o_k = i_k * KS + tl.arange(0, KS)
        m_k = o_k < K
        b_q, b_k, b_g = chunk_slice(q, k, g, A_log, dt_bias, lower_bound, o_t, m_t, i_kh, i_h, o_k, m_k, H, HV, K,
                                    USE_GATE, USE_LB, HAS_A, HAS_BIAS)
        ss_q += tl.sum(b_q * b_q, 1)
        ss_k += tl.sum(b_k * b_k, 1)
        akk3, aqk3 = slice_products(b_q, b_k, b_g, m_t, m_k, shift, akk3, aqk3, C, KS, DOT_PREC)
        if CHECK:
            m_tk = m_t[:, None] & m_k[None, :]
            far = tl.maximum(far, tl.max(tl.where(m_tk, tl.abs(b_g - block_rows_j(b_g, 0, C, KS) + shift), 0.0), 1))
    b_akk = tl.reshape(akk3, (C, C))
    b_aqk = tl.reshape(aqk3, (C, C))
    if CHECK:
        # row r is in range when it and every earlier row of its block keep |Gamma - Gamma_f + d| <= SPAN_MAX
        o_16 = tl.arange(0, BLOCK)
        far3 = tl.reshape(far, (NB, BLOCK))
        upto = tl.max(tl.where(o_16[None, None, :] <= o_16[None, :, None], far3[:, None, :], 0.0), 2)
        exact = tl.reshape(upto, (C,)) > SPAN_MAX
        if tl.max(exact.to(tl.int32), 0) > 0:   # rare: masked tokens, g ~ -1000
            x_kk = tl.zeros([C, C], dtype=tl.float32)
            x_qk = tl.zeros([C, C], dtype=tl.float32)
            for i_k in tl.range(0, tl.cdiv(K, KS), num_stages=1):
                o_k = i_k * KS + tl.arange(0, KS)
                m_k = o_k < K
                b_q, b_k, b_g = chunk_slice(q, k, g, A_log, dt_bias, lower_bound, o_t, m_t, i_kh, i_h, o_k, m_k,
                                            H, HV, K, USE_GATE, USE_LB, HAS_A, HAS_BIAS)
                x_kk, x_qk = diag_tiles_elementwise(b_q, b_k, b_g, m_t, m_k, x_kk, x_qk, C, KS)
            diag = ((o_c[None, :] // BLOCK) == (o_c // BLOCK)[:, None]) & exact[:, None]
            b_akk = tl.where(diag, x_kk, b_akk)
            b_aqk = tl.where(diag, x_qk, b_aqk)
    rq = tl.full([C], 1.0, tl.float32)
    rk = tl.full([C], 1.0, tl.float32)
    if L2NORM:
        rq = tl.rsqrt(ss_q + L2NORM_EPS)
        rk = tl.rsqrt(ss_k + L2NORM_EPS)
        b_akk = b_akk * rk[:, None] * rk[None, :]
        b_aqk = b_aqk * rq[:, None] * rk[None, :]
    return b_akk, b_aqk, rq, rk


@triton.jit
def chunk_output(q, k, g, A_log, dt_bias, o, ht, b_t, b_u, b_aqk, rq, rk, lower_bound, scale, o_t, m_t, i_kh, i_h,
                 p_v, m_tv, p_state, o_v, m_v, s_k,
                 H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, KS: tl.constexpr, USE_GATE: tl.constexpr,
                 USE_LB: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
                 PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """Write the chunk's ``[C, BV]`` output block ``scale qg S + aqk V_new`` and return ``V_new = U - W S`` (v's
    dtype), with ``W = T (k exp(Gamma))`` and ``qg = q exp(Gamma)`` formed K slice by K slice against the
    matching rows of the state ``S`` (read from ``ht``, the program's running state)."""
    b_ws = tl.zeros(b_u.shape, dtype=tl.float32)
    b_qs = tl.zeros(b_u.shape, dtype=tl.float32)
    for i_k in tl.range(0, tl.cdiv(K, KS), num_stages=1):
        o_k = i_k * KS + tl.arange(0, KS)
        m_k = o_k < K
        b_q, b_k, b_g = chunk_slice(q, k, g, A_log, dt_bias, lower_bound, o_t, m_t, i_kh, i_h, o_k, m_k, H, HV, K,
                                    USE_GATE, USE_LB, HAS_A, HAS_BIAS)
        e_g = tl.where(m_t[:, None] & m_k[None, :], tl.exp(b_g), 0.0)
        b_w = tl.dot(b_t, finite_or_zero(b_k * rk[:, None] * e_g), input_precision=DOT_PREC).to(k.dtype.element_ty)
        b_qg = (b_q * rq[:, None] * e_g).to(q.dtype.element_ty)
        b_si = tl.load(ht + p_state + (i_k * KS + tl.arange(0, KS))[:, None] * s_k,
                       mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_ws += mm(b_w, b_si.to(b_w.dtype), INTERPRET, PREC)
        b_qs += mm(b_qg, b_si.to(b_qg.dtype), INTERPRET, PREC)
    b_vn = (b_u.to(tl.float32) - b_ws).to(b_u.dtype)
    b_o = b_qs * scale + mm(b_aqk, b_vn, INTERPRET, PREC)
    tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_tv)
    return b_vn


@triton.jit
def state_update(q, k, g, A_log, dt_bias, ht, b_vn, rk, lower_bound, last, o_t, m_t, i_kh, i_h, p_state, m_v, s_k,
                 H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, KS: tl.constexpr, USE_GATE: tl.constexpr,
                 USE_LB: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """``S <- diag(exp(gc)) S + kg^T V_new`` in ``ht``, K slice by K slice, with ``kg = k exp(gc - Gamma)`` and gc
    Gamma at the chunk's row ``last``."""
    o_c = tl.arange(0, b_vn.shape[0])
    for i_k in tl.range(0, tl.cdiv(K, KS), num_stages=1):
        o_k = i_k * KS + tl.arange(0, KS)
        m_k = o_k < K
        b_q, b_k, b_g = chunk_slice(q, k, g, A_log, dt_bias, lower_bound, o_t, m_t, i_kh, i_h, o_k, m_k, H, HV, K,
                                    USE_GATE, USE_LB, HAS_A, HAS_BIAS)
        b_gc = tl.sum(tl.where((o_c == last)[:, None], b_g, 0.0), 0)
        b_kg = tl.where(m_t[:, None] & m_k[None, :], b_k * rk[:, None] * tl.exp(b_gc[None, :] - b_g),
                        0.0).to(k.dtype.element_ty)
        p_si = ht + p_state + (i_k * KS + tl.arange(0, KS))[:, None] * s_k
        m_si = m_k[:, None] & m_v[None, :]
        b_si = tl.load(p_si, mask=m_si, other=0.0)
        tl.store(p_si, b_si * tl.exp(b_gc)[:, None] + mm(tl.trans(b_kg), b_vn.to(b_kg.dtype), INTERPRET, PREC),
                 mask=m_si)


@triton.jit
def fused_chunk_step(q, k, v, g, beta, A_log, dt_bias, o, ht, bos, eos, j, i_h, o_v, m_v, p_state, s_k,
                     scale, shift, lower_bound,
                     H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                     KS: tl.constexpr, USE_GATE: tl.constexpr, USE_LB: tl.constexpr,
                     HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr, L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr,
                     BETA_SCALE: tl.constexpr, CHECK: tl.constexpr, DOT_PREC: tl.constexpr, PREC: tl.constexpr,
                     SOLVE_PREC: tl.constexpr, SOLVE_DIAG: tl.constexpr, INTERPRET: tl.constexpr):
    """Chunk ``j`` of the program's sequence: write its ``[C, BV]`` output block and advance the state in ``ht``."""
    i_kh = i_h // (HV // H)
    t0 = bos + j * C
    o_c = tl.arange(0, C)
    # the chunk's first token: its rows are then addressed by int32 offsets o_t (0 .. C-1)
    q, k, g, beta = q + t0 * (H * K), k + t0 * (H * K), g + t0 * (HV * K), beta + t0 * HV
    v, o = v + t0 * (HV * V), o + t0 * (HV * V)
    o_t = o_c
    m_t = o_t < eos - t0
    # ---- A_kk (times beta, strictly causal) and aqk (scaled, causal), by selection, K slice by K slice
    b_akk, b_aqk, rq, rk = chunk_a(q, k, g, A_log, dt_bias, lower_bound, o_t, m_t, i_kh, i_h, shift, H, HV, K, C,
                                   KS, USE_GATE, USE_LB, HAS_A, HAS_BIAS, L2NORM, CHECK, DOT_PREC)
    b_beta = chunk_beta(beta, o_t, m_t, i_h, HV, BETA_SIGMOID, BETA_SCALE)
    valid = m_t[:, None] & m_t[None, :]
    b_akk = tl.where((o_c[:, None] > o_c[None, :]) & valid, b_akk * b_beta[:, None], 0.0)
    b_aqk = tl.where((o_c[:, None] >= o_c[None, :]) & valid, b_aqk * scale, 0.0).to(v.dtype.element_ty)
    # ---- T and U = T v (rounded as the staged forward stores it)
    b_t = block_inverse_registers(b_akk, b_beta, C, SOLVE_PREC, SOLVE_DIAG)
    m_tv = m_t[:, None] & m_v[None, :]
    p_v = o_t[:, None] * (HV * V) + i_h * V + o_v[None, :]
    b_u = tl.dot(b_t, tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32),
                 input_precision=DOT_PREC).to(v.dtype.element_ty)
    # ---- V_new and the output, then the state update (all threads read S before any writes it)
    b_vn = chunk_output(q, k, g, A_log, dt_bias, o, ht, b_t, b_u, b_aqk, rq, rk, lower_bound, scale, o_t, m_t, i_kh,
                        i_h, p_v, m_tv, p_state, o_v, m_v, s_k, H, HV, K, KS, USE_GATE, USE_LB, HAS_A, HAS_BIAS,
                        DOT_PREC, PREC, INTERPRET)
    tl.debug_barrier()
    state_update(q, k, g, A_log, dt_bias, ht, b_vn, rk, lower_bound, tl.minimum(eos - t0, C) - 1, o_t, m_t, i_kh, i_h,
                 p_state, m_v, s_k, H, HV, K, KS, USE_GATE, USE_LB, HAS_A, HAS_BIAS, PREC, INTERPRET)
    tl.debug_barrier()


# ------------------------------------------------------------------------------------------------- kernel

@triton.jit
def kda_fused_kernel(
    q, k, v, g, beta, A_log, dt_bias, h0, o, ht, cu, seq_first, s_k, s_v, scale, shift, lower_bound,
    # task config
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, KS: tl.constexpr,
    USE_GATE: tl.constexpr, USE_LB: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr, CHECK: tl.constexpr,
    HAS_H0: tl.constexpr, INTERPRET: tl.constexpr,
    # kernel config
    BV: tl.constexpr, DOT_PREC: tl.constexpr, PREC: tl.constexpr, SOLVE_PREC: tl.constexpr,
    SOLVE_DIAG: tl.constexpr,
):
    """The whole forward of one (V block, sequence, value head): grid ``(cdiv(V, BV), sequences * HV)``.  The
    program's ``[K, BV]`` state tile in ``ht`` (float32) is its running state: ``h0``'s tile (or zeros) on entry,
    the final state on exit."""
    i_n, i_h, bos, eos, first, o_k, m_k, o_v, m_v, m_kv, p_state = state_walk_program(cu, seq_first, s_k, s_v, HV, K,
                                                                                     V, KS, BV)
    p_state = p_state - o_k[:, None] * s_k     # the tile's first row; slices add their own rows
    for i_k in tl.range(0, tl.cdiv(K, KS), num_stages=1):
        o_ks = i_k * KS + o_k
        p_si = p_state + o_ks[:, None] * s_k
        m_si = (o_ks < K)[:, None] & m_v[None, :]
        tl.store(ht + p_si, state_tile(h0, p_si, m_si, KS, BV, HAS_H0), mask=m_si)
    tl.debug_barrier()
    n_chunks = tl.cdiv(eos - bos, C)
    if INTERPRET:  # the CPU interpreter cannot take a run-time range bound; a while loop computes the same
        j = 0
        while j < n_chunks:
            fused_chunk_step(q, k, v, g, beta, A_log, dt_bias, o, ht, bos, eos, j, i_h, o_v, m_v, p_state, s_k,
                             scale, shift, lower_bound, H, HV, K, V, C, KS, USE_GATE, USE_LB, HAS_A, HAS_BIAS,
                             L2NORM, BETA_SIGMOID, BETA_SCALE, CHECK, DOT_PREC, PREC, SOLVE_PREC, SOLVE_DIAG,
                             INTERPRET)
            j += 1
    else:
        # no software pipelining of the loads and no hoisting of a chunk's loop-invariant tiles (masks, the
        # identity, pointer offsets) out of the walk: either keeps extra tiles live across every chunk (spills)
        for j in tl.range(0, n_chunks, num_stages=1, disable_licm=True):
            fused_chunk_step(q, k, v, g, beta, A_log, dt_bias, o, ht, bos, eos, j, i_h, o_v, m_v, p_state, s_k,
                             scale, shift, lower_bound, H, HV, K, V, C, KS, USE_GATE, USE_LB, HAS_A, HAS_BIAS,
                             L2NORM, BETA_SIGMOID, BETA_SCALE, CHECK, DOT_PREC, PREC, SOLVE_PREC, SOLVE_DIAG,
                             INTERPRET)


# --------------------------------------------------------------------------------------------------- host

def chunk_fused(q, k, v, g, beta, A_log, dt_bias, initial_state, opts, table, output_final_state: bool, cfg):
    """Run the fused forward on flat tensors ``q, k [TT, H, K]``, ``v [TT, HV, V]``, ``g [TT, HV, K]``,
    ``beta [TT, HV]`` (``cfg`` a :class:`config.ChunkConfig`).  Returns ``(o [TT, HV, V] in v's dtype, final
    state (float32, user layout) or None)``."""
    TT, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    N = table.num_seqs
    BV = min(cfg.fused_BV or state_block_v(N, HV, V), triton.next_power_of_2(V))
    o = torch.empty_like(v)
    shape = (N, HV, V, K) if opts.state_v_first else (N, HV, K, V)
    ht = torch.empty(shape, device=q.device, dtype=torch.float32)    # the running states, the final ones at the end
    s_k, s_v = (1, K) if opts.state_v_first else (V, 1)
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    if not N:
        return o, ht if output_final_state else None
    use_gate = opts.use_gate_in_kernel
    use_lb = use_gate and opts.lower_bound is not None
    lower_bound = float(opts.lower_bound) if use_lb else 0.0
    shift, check = factor_shift(use_lb, lower_bound)
    kda_fused_kernel[(triton.cdiv(V, BV), N * HV)](
        q, k, v, g, beta, A_log if A_log is not None else g, dt_bias if dt_bias is not None else g,
        initial_state if initial_state is not None else q, o, ht, table.cu, table.seq_first,
        s_k, s_v, float(opts.scale), shift, lower_bound,
        H=H, HV=HV, K=K, V=V, C=table.chunk_size, KS=min(K_SLICE, triton.next_power_of_2(K)), USE_GATE=use_gate,
        USE_LB=use_lb, HAS_A=use_gate and A_log is not None, HAS_BIAS=use_gate and dt_bias is not None,
        L2NORM=opts.use_qk_l2norm_in_kernel, BETA_SIGMOID=opts.use_beta_sigmoid_in_kernel,
        BETA_SCALE=2.0 if opts.allow_neg_eigval else 1.0, CHECK=check, HAS_H0=initial_state is not None,
        INTERPRET=interpreting(),
        BV=BV, DOT_PREC=cfg.precision, PREC=cfg.precision, SOLVE_PREC=cfg.solve_precision,
        SOLVE_DIAG=cfg.solve_diag, num_warps=cfg.fused_warps)
    return o, ht if output_final_state else None
