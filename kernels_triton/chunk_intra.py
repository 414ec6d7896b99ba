"""Stage 1 of the Triton chunkwise forward, intra: everything that stays inside one chunk (docs/algorithm.md).

Per (chunk, value head), with the prologues applied (gate, q/k L2 norm, beta activation; gate.py):

    Gamma      = chunk-local cumulative sum of the log decay          (float32, scratch)
    A_kk[r,s]  = beta_r sum_c k_r[c] exp(Gamma_r[c] - Gamma_s[c]) k_s[c]   (s < r)
    aqk[r,s]   = scale  sum_c q_r[c] exp(Gamma_r[c] - Gamma_s[c]) k_s[c]   (s <= r)
    T          = (I + A_kk)^-1 diag(beta),  w = T (k * exp(Gamma)),  u = T v
    qg = q * exp(Gamma),  kg = k * exp(gc - Gamma),  gc = Gamma at the chunk's last row

Three kernels, launched in order by :func:`chunk_intra`:

1. ``kda_gamma_kernel`` (chunks x HV x K slices): Gamma to the scratch, gc.
2. ``kda_intra_kernel`` (C/16 row blocks x chunks, HV; row block fastest, so a chunk's programs share its
   k and Gamma through L2): its 16 rows of qg, kg, ke = k exp(Gamma) (into w's buffer), then its rows of
   A_kk (scratch, zeros above the diagonal) and aqk, one tensor-core product per K slice.
3. ``kda_solve_kernel`` (chunks x HV): T by the blocked inverse (solve_tril.py), ``w = T ke`` in place,
   ``u = T v``.

Numerics.  Each row block is one product factored around the block's first row f, shifted by d:
``exp(Gamma_r - Gamma_f + d) * exp(Gamma_f - d - Gamma_s)``.  Entry (r, s) then depends only on tokens up to
max(r, s): causal bit for bit (changing a later token never moves an earlier output).  Both factors stay within
exp(+-SPAN_MAX) while ``Gamma_r - Gamma_f`` lies in ``[-SPAN_MAX - d, SPAN_MAX - d]``:

* safe gate (``g = lower_bound * sigmoid(.)``, |lower_bound| <= SAFE_BOUND): 15 tokens move Gamma by at most
  15 |lower_bound|, so ``d = -7.5 lower_bound`` centres the range and no row is checked;
* otherwise ``d = SPAN_MAX / 2`` and each row is checked against the rows before it; rows out of range (after a
  masked token, g = -1000) take their diagonal tile element-wise, every exponent <= 0.  The choice is per row and
  looks only at earlier rows, so it is causal too.  Tiles left of the diagonal need no check: with g <= 0 both
  factors are <= exp(d) there, and an underflowed factor means an entry below exp(-SPAN_MAX / 2).

A gate of -inf ("forget everything") is floored at G_FLOOR (gate.py), whose exp is 0 as well.  A NaN or +inf
gate at token t makes its own and later rows NaN; the solve kernel zeroes non-finite entries of A_kk and ke
before its dense products, where 0 * NaN would otherwise leak into the rows before t.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .gate import SPAN_MAX, beta_act, chunk_beta, chunk_bounds, chunk_gamma, finite_or_zero, row_norms
from .solve_tril import block_inverse, t_times_v

BLOCK = 16         # row block of the A products and diagonal block of the inverse
# the solve kernel's X_MODE: what it does with the token-indexed X (none, store it, load it instead of inverting)
X_NONE, X_STORE, X_LOAD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
SAFE_BOUND = 8.0   # largest |lower_bound| of the safe gate for which no row needs the range check
# launch constants measured on the H100 (docs/triton.md): the Gamma kernel at 4 warps; the intra kernel without
# software pipelining (349 µs against 440 with the compiler's default, B2·T8192·H16); the solve kernel's K loop
# without pipelining
GAMMA_WARPS = 4
INTRA_STAGES = 1
SOLVE_STAGES = 1


def get_configs() -> list[dict]:
    """Search space of this stage, alternatives to the defaults of config.ChunkConfig, one knob each (H100, µs per
    forward at B8·T4096·H32 safe gate: default 4034, solve_diag "subst" 4131, intra_warps 8 4294, solve_warps 8
    5365; gamma_BK 64 within 1 %)."""
    return [{"solve_diag": "subst"}, {"solve_diag": "ieee"}, {"intra_warps": 8}, {"intra_BK": 16},
            {"intra_norms": "first"}, {"intra_row_BK": 32}, {"gamma_BK": 64}, {"solve_warps": 8},
            {"solve_maxnreg": 128}, {"solve_maxnreg": 168}]


# ------------------------------------------------------------------------------------------------- helpers

@triton.jit
def a_views(a_scratch, i_c, i_h, HV: tl.constexpr, C: tl.constexpr):
    """The float32 A scratch of chunk ``i_c`` and value head ``i_h`` (C^2 + 16 C floats): ``base`` (A_kk ``[C, C]``)
    and ``dinv`` (``[C, 16]``, the inverses of A_kk's diagonal blocks)."""
    base = a_scratch + (i_c.to(tl.int64) * HV + i_h) * (C * C + C * 16)
    return base, base + C * C


@triton.jit
def gamma_rows(g_scratch, i_c, i_h, HV: tl.constexpr, C: tl.constexpr, KP: tl.constexpr):
    """Gamma ``[C, KP]`` (float32) of chunk ``i_c`` and value head ``i_h`` in the Gamma scratch."""
    return g_scratch + (i_c.to(tl.int64) * HV + i_h) * (C * KP)


@triton.jit
def block_outputs(qg, kg, ke, s_g, r_qi, r_ki, b_qi, b_ki, b_gi, t0, last, t_i, mi, o_k, i_h,
                  HV: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
    """Rows ``t_i`` (channels ``o_k``) of ``qg = q r_q exp(Gamma)``, ``kg = k r_k exp(gc - Gamma)`` and
    ``ke = k r_k exp(Gamma)`` from the raw rows ``b_qi``, ``b_ki``, their norm factors and their Gamma ``b_gi``
    (every exponent <= 0 on valid rows); gc from the scratch."""
    p_o = t_i[:, None] * (HV * K) + i_h * K + o_k[None, :]
    b_gc = tl.load(s_g + (last - t0) * KP + o_k)
    e_g = tl.where(mi, tl.exp(b_gi), 0.0)
    b_kr = b_ki * r_ki[:, None]
    tl.store(qg + p_o, (b_qi * r_qi[:, None] * e_g).to(qg.dtype.element_ty), mask=mi)
    tl.store(ke + p_o, (b_kr * e_g).to(ke.dtype.element_ty), mask=mi)
    tl.store(kg + p_o, tl.where(mi, b_kr * tl.exp(b_gc[None, :] - b_gi), 0.0).to(kg.dtype.element_ty), mask=mi)


@triton.jit
def store_a_block(b_akk, b_aqk, base, aqk, beta, b_ri, b_rki, t0, eos, i, i_h, scale, HV: tl.constexpr,
                  C: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr):
    """Row block ``i`` of A_kk (rows times ``r_k beta``, strictly causal, to the scratch at ``base``, zeros above
    the diagonal included) and of aqk (rows times ``r_q scale``, causal, to ``aqk [TT, HV, C]``) from the raw
    products ``[16, C]`` and the rows' norm factors ``b_ri`` (q) and ``b_rki`` (k)."""
    o_c = tl.arange(0, C)
    o_i = 16 * i + tl.arange(0, 16)
    t_i = t0 + o_i
    m_i = t_i < eos
    valid = m_i[:, None] & ((t0 + o_c) < eos)[None, :]
    b_bi = beta_act(tl.load(beta + t_i * HV + i_h, mask=m_i, other=0.0), BETA_SIGMOID, BETA_SCALE)
    b_akk = tl.where((o_i[:, None] > o_c[None, :]) & valid, b_akk * (b_rki * b_bi)[:, None], 0.0)
    b_aqk = tl.where((o_i[:, None] >= o_c[None, :]) & valid, b_aqk * (b_ri * scale)[:, None], 0.0)
    tl.store(base + o_i[:, None] * C + o_c[None, :], b_akk)
    tl.store(aqk + t_i[:, None] * (HV * C) + i_h * C + o_c[None, :], b_aqk.to(aqk.dtype.element_ty),
             mask=m_i[:, None])


@triton.jit
def diag_block_elementwise(q, k, s_g, r_cols, t0, eos, i, i_kh, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                           KP: tl.constexpr, BK: tl.constexpr):
    """Row block ``i`` of ``sum_c x_r[c] exp(Gamma_r[c] - Gamma_s[c]) k_s[c] r_cols[s]`` for x = k and x = q over the
    block's own columns s = 16 i + j (``[16, C]``, other columns 0), element-wise: one column per step, every
    exponent kept <= 0 (r >= s).  ``r_cols``: the norm factors of those 16 columns (or ones)."""
    o_16 = tl.arange(0, 16)
    o_c = tl.arange(0, C)
    o_i = 16 * i + o_16
    m_i = (t0 + o_i) < eos
    d_kk = tl.zeros([16, C], dtype=tl.float32)
    d_qk = tl.zeros([16, C], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        mi = m_i[:, None] & m_k[None, :]
        p_i = (t0 + o_i)[:, None] * (H * K) + i_kh * K + o_k[None, :]
        b_q = tl.load(q + p_i, mask=mi, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_i, mask=mi, other=0.0).to(tl.float32)
        b_g = tl.load(s_g + o_i[:, None] * KP + o_k[None, :], mask=mi, other=0.0)
        for j in range(0, 16):
            s = 16 * i + j
            # token s is inside the sequence, as a vector over the channels (a scalar mask breaks the
            # interpreter of newer Triton releases)
            m_s = (o_k * 0 + t0 + s) < eos
            b_gj = tl.load(s_g + s * KP + o_k, mask=m_k, other=0.0)
            b_kj = tl.load(k + (t0 + s) * (H * K) + i_kh * K + o_k, mask=m_k & m_s, other=0.0).to(tl.float32)
            b_kj = b_kj * tl.sum(tl.where(o_16 == j, r_cols, 0.0))
            causal = (o_16 >= j) & m_i
            b_kd = b_kj[None, :] * tl.where(causal[:, None] & m_k[None, :], tl.exp(b_g - b_gj[None, :]), 0.0)
            sel = o_c[None, :] == s
            d_kk += tl.where(sel, tl.sum(b_k * b_kd, 1)[:, None], 0.0)
            d_qk += tl.where(sel, tl.sum(b_q * b_kd, 1)[:, None], 0.0)
    return d_kk, d_qk


# ------------------------------------------------------------------------------------------------- kernels

@triton.jit
def kda_gamma_kernel(
    g, A_log, dt_bias, gc, g_scratch, chunk_seq, chunk_pos, cu, lower_bound,
    HV: tl.constexpr, K: tl.constexpr, C: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr,
    USE_GATE: tl.constexpr, USE_LB: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Gamma (gate + chunk-local cumsum, float32) of channels ``BK * program_id(2) + [0, BK)`` of one chunk and
    value head to the scratch, and gc.  One K slice per program: walking the slices in one program waits on
    each load in turn."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos, last = chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C)
    s_g = gamma_rows(g_scratch, i_c, i_h, HV, C, KP)
    o_c = tl.arange(0, C)
    o_t = t0 + o_c
    o_k = tl.program_id(2) * BK + tl.arange(0, BK)
    m_k = o_k < K
    m = (o_t < eos)[:, None] & m_k[None, :]
    b_g = chunk_gamma(g, A_log, dt_bias, lower_bound, o_t, m, i_h, o_k, m_k, HV, K, USE_GATE, USE_LB, HAS_A, HAS_BIAS)
    tl.store(s_g + o_c[:, None] * KP + o_k[None, :], b_g)
    tl.store(gc + (i_c.to(tl.int64) * HV + i_h) * K + o_k, tl.sum(tl.where((o_c == last - t0)[:, None], b_g, 0.0), 0),
             mask=m_k)


@triton.jit
def kda_intra_kernel(
    q, k, beta, aqk, qg, kg, ke, a_scratch, g_scratch, chunk_seq, chunk_pos, cu, scale, shift,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, C: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr,
    BKR: tl.constexpr, L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr,
    DOT_PREC: tl.constexpr, CHECK: tl.constexpr, NUM_STAGES: tl.constexpr, NORMS_FIRST: tl.constexpr,
    FORM_A: tl.constexpr,
):
    """Row block ``i`` of chunk ``i_c``: its rows of qg, kg, ke, and (``FORM_A``) its rows of A_kk (scratch, zeros
    above the diagonal) and aqk.  ``BKR``: K slice of the first round over the block's own rows (whole rows when
    >= K); ``BK``: K slice of the products; ``shift``: d of the module docstring; Gamma from the scratch."""
    i, i_c, i_h = tl.program_id(0) % (C // 16), tl.program_id(0) // (C // 16), tl.program_id(1)
    i_kh = i_h // (HV // H)
    t0, eos, last = chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C)
    base, _ = a_views(a_scratch, i_c, i_h, HV, C)
    s_g = gamma_rows(g_scratch, i_c, i_h, HV, C, KP)
    o_16 = tl.arange(0, 16)
    o_i = 16 * i + o_16
    t_i = t0 + o_i
    m_i = t_i < eos
    o_c = tl.arange(0, C)
    m_t = (t0 + o_c) < eos

    # round 1, the block's own rows: norm factors, then qg / kg / ke and (CHECK) how far each row's Gamma is
    # from the first row's
    cols = m_t & (o_c < 16 * (i + 1))   # the columns this block uses: rows s < 16 (i + 1), its own included
    r_q = tl.full([16], 1.0, tl.float32)
    r_k = tl.full([16], 1.0, tl.float32)
    r_s = tl.full([C], 1.0, tl.float32)
    if L2NORM and NORMS_FIRST:
        # the norm factors of the block's q rows and of every k row it uses as a column, before everything; its
        # own k rows' factors are taken from the columns' (the same numbers in both roles)
        r_q = row_norms(q, t_i, m_i, i_kh, H, K, 16, BKR)
        r_s = row_norms(k, t0 + o_c, cols, i_kh, H, K, C, BKR)
        r_k = tl.sum(tl.where(o_c[None, :] == o_i[:, None], r_s[None, :], 0.0), 1)
    elif L2NORM:  # the block's own rows only; the columns' factors in a pass after the products
        r_q = row_norms(q, t_i, m_i, i_kh, H, K, 16, BKR)
        r_k = row_norms(k, t_i, m_i, i_kh, H, K, 16, BKR)
    out = tl.zeros([16], dtype=tl.float32)
    for i_r in range(0, tl.cdiv(K, BKR)):
        o_r = i_r * BKR + tl.arange(0, BKR)
        mr = m_i[:, None] & (o_r < K)[None, :]
        p_r = t_i[:, None] * (H * K) + i_kh * K + o_r[None, :]
        b_q = tl.load(q + p_r, mask=mr, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_r, mask=mr, other=0.0).to(tl.float32)
        b_g = tl.load(s_g + o_i[:, None] * KP + o_r[None, :], mask=mr, other=0.0)
        block_outputs(qg, kg, ke, s_g, r_q, r_k, b_q, b_k, b_g, t0, last, t_i, mr, o_r, i_h, HV, K, KP)
        if CHECK and FORM_A:
            b_fr = tl.load(s_g + 16 * i * KP + o_r, mask=o_r < K, other=0.0)
            out = tl.maximum(out, tl.max(tl.where(mr, tl.abs(b_g - b_fr[None, :] + shift), 0.0), 1))

    if FORM_A:
        # round 2: one product per K slice, rows against the columns s < 16 (i + 1), factored around the first row:
        # exp(Gamma_r - Gamma_f + d) * exp(Gamma_f - d - Gamma_s); the columns' norms accumulate on the way
        b_akk = tl.zeros([16, C], dtype=tl.float32)
        b_aqk = tl.zeros([16, C], dtype=tl.float32)
        for i_k in tl.range(0, tl.cdiv(K, BK), num_stages=NUM_STAGES):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            mi = m_i[:, None] & m_k[None, :]
            ms = cols[:, None] & m_k[None, :]
            p_i = t_i[:, None] * (H * K) + i_kh * K + o_k[None, :]
            b_ki = tl.load(k + p_i, mask=mi, other=0.0).to(tl.float32)
            b_qi = tl.load(q + p_i, mask=mi, other=0.0).to(tl.float32)
            b_gi = tl.load(s_g + o_i[:, None] * KP + o_k[None, :])
            b_gs = tl.load(s_g + o_c[:, None] * KP + o_k[None, :])
            b_f = tl.load(s_g + 16 * i * KP + o_k, mask=m_k, other=0.0)
            e_r = tl.where(mi, tl.exp(b_gi - b_f[None, :] + shift), 0.0)
            b_ki = b_ki * e_r
            b_qi = b_qi * e_r
            b_ks = tl.load(k + (t0 + o_c)[:, None] * (H * K) + i_kh * K + o_k[None, :], mask=ms, other=0.0)
            b_ks = b_ks.to(tl.float32)
            e_s = tl.where(ms, tl.exp(b_f[None, :] - shift - b_gs), 0.0)
            b_ks = tl.trans(b_ks * e_s)
            b_akk += tl.dot(b_ki, b_ks, input_precision=DOT_PREC)
            b_aqk += tl.dot(b_qi, b_ks, input_precision=DOT_PREC)
        if CHECK:
            # row r is in range when it and every earlier row of its block keep |Gamma - Gamma_f + d| <= SPAN_MAX
            exact = tl.max(tl.where(o_16[None, :] <= o_16[:, None], out[None, :], 0.0), 1) > SPAN_MAX
            any_exact = tl.max(exact.to(tl.int32), 0) > 0
        else:
            exact = o_16 < 0
            any_exact = False
        if L2NORM:  # the columns' norm factors, after the products (fewer values live in them)
            if not NORMS_FIRST:
                r_s = row_norms(k, t0 + o_c, cols, i_kh, H, K, C, BK)
            b_akk = b_akk * r_s[None, :]
            b_aqk = b_aqk * r_s[None, :]
        if any_exact:  # rows out of range (rare: masked tokens, g ~ -1000): their diagonal tile element-wise
            x_kk, x_qk = diag_block_elementwise(q, k, s_g, r_k, t0, eos, i, i_kh, H, K, C, KP, BK)
            diag = (o_c[None, :] // 16 == i) & exact[:, None]
            b_akk = tl.where(diag, x_kk, b_akk)
            b_aqk = tl.where(diag, x_qk, b_aqk)
        store_a_block(b_akk, b_aqk, base, aqk, beta, r_q, r_k, t0, eos, i, i_h, scale, HV, C, BETA_SIGMOID,
                      BETA_SCALE)


@triton.jit
def kda_solve_kernel(
    w, v, beta, u, a_scratch, x, chunk_seq, chunk_pos, cu,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, KP: tl.constexpr,
    BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PREC: tl.constexpr, SOLVE_PREC: tl.constexpr, SOLVE_DIAG: tl.constexpr, NUM_STAGES: tl.constexpr,
    X_MODE: tl.constexpr,
):
    """T = X diag(beta) with X = (I + A_kk)^-1 from the scratch (the inverses of A_kk's diagonal blocks stored beside
    it on the way); ``w = T ke`` (in place over ke, each program reads a ``[C, BK]`` block of its own chunk before it
    writes it), ``u = T v``.  ``X_MODE``: X_STORE also writes the chunk's rows of X to ``x [TT, HV, C]`` (float32,
    token-indexed, for the backward); X_LOAD reads X from there instead of inverting (A_kk was not formed)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos, last = chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C)
    o_c = tl.arange(0, C)
    o_t = t0 + o_c
    m_t = o_t < eos
    p_x = x + o_t[:, None] * (HV * C) + i_h * C + o_c[None, :]

    b_beta = chunk_beta(beta, o_t, m_t, i_h, HV, BETA_SIGMOID, BETA_SCALE)
    if X_MODE == X_LOAD:  # the rows past the chunk's end read as 0: only valid rows are stored below
        b_x = tl.load(p_x, mask=m_t[:, None], other=0.0)
    else:
        base, dinv = a_views(a_scratch, i_c, i_h, HV, C)
        b_x = block_inverse(base, dinv, tl.full([C], 1.0, tl.float32), C, SOLVE_PREC, SOLVE_DIAG)
        if X_MODE == X_STORE:
            tl.store(p_x, b_x, mask=m_t[:, None])
    b_m = b_x * b_beta[None, :]
    for i_k in tl.range(0, tl.cdiv(K, BK), num_stages=NUM_STAGES):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        p_w = w + o_t[:, None] * (HV * K) + i_h * K + o_k[None, :]
        b_ke = finite_or_zero(tl.load(p_w, mask=m, other=0.0).to(tl.float32))
        tl.store(p_w, tl.dot(b_m, b_ke, input_precision=DOT_PREC).to(w.dtype.element_ty), mask=m)
    t_times_v(b_m, v, u, o_t, m_t, i_h, HV, V, BV, DOT_PREC, NUM_STAGES)


# --------------------------------------------------------------------------------------------------- host

def factor_shift(use_lower_bound: bool, lower_bound: float) -> tuple[float, bool]:
    """``(d, CHECK)`` of the intra kernel: the safe gate with |lower_bound| <= SAFE_BOUND needs no range check."""
    if use_lower_bound and abs(lower_bound) <= SAFE_BOUND:
        return -7.5 * lower_bound, False
    return SPAN_MAX.value / 2, True


class Intra(NamedTuple):
    """The outputs of the intra stage (the conventions of docs/algorithm.md): aqk ``[TT, HV, C]`` (scaled,
    causal, v's dtype), w ``[TT, HV, K]`` (k's dtype), u ``[TT, HV, V]`` (v's dtype), qg, kg ``[TT, HV, K]`` (q's /
    k's dtype), gc ``[chunks, HV, K]`` (float32), gamma ``[chunks, HV, C, KP]`` (float32, the stage's Gamma
    scratch) and x ``[TT, HV, C]`` (X = (I + A_kk)^-1, float32, token-indexed: row r of a chunk at its token r;
    None unless the stage was asked to keep it or given it)."""

    aqk: torch.Tensor
    w: torch.Tensor
    u: torch.Tensor
    qg: torch.Tensor
    kg: torch.Tensor
    gc: torch.Tensor
    gamma: torch.Tensor
    x: torch.Tensor | None


class Kept(NamedTuple):
    """What a training forward keeps for its backward: X ``[TT, HV, C]`` (float32) and aqk ``[TT, HV, C]``
    (v's dtype), as :class:`Intra` holds them."""

    x: torch.Tensor
    aqk: torch.Tensor


def chunk_intra(q, k, v, g, beta, A_log, dt_bias, opts, table, cfg, keep_x: bool = False,
                kept: Kept | None = None) -> Intra:
    """Run the intra stage on flat tensors ``q, k [TT, H, K]``, ``v [TT, HV, V]``, ``g [TT, HV, K]`` (log decay,
    or the raw gate with ``use_gate_in_kernel``), ``beta [TT, HV]``; ``cfg`` a :class:`config.ChunkConfig`.
    Returns :class:`Intra`.  ``keep_x``: the solve kernel also stores X (its ``x``).  ``kept``: X and aqk of an
    earlier run on the same inputs (a training forward's): A_kk and aqk are not formed again and X is read instead
    of inverted, so only Gamma, qg, kg, w and u are computed."""
    TT, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    C, NC = table.chunk_size, table.num_chunks
    dev = q.device
    if kept is not None:
        aqk, x = kept.aqk, kept.x
        if tuple(x.shape) != (TT, HV, C) or tuple(aqk.shape) != (TT, HV, C) or not (x.is_contiguous()
                                                                                   and aqk.is_contiguous()):
            raise ValueError(f"the kept X and aqk must be contiguous [TT, HV, C] = {[TT, HV, C]}, got "
                             f"{list(x.shape)} and {list(aqk.shape)}")
    else:
        aqk = torch.empty(TT, HV, C, device=dev, dtype=v.dtype)
        x = torch.empty(TT, HV, C, device=dev, dtype=torch.float32) if keep_x else None
    w = torch.empty(TT, HV, K, device=dev, dtype=k.dtype)
    u = torch.empty(TT, HV, V, device=dev, dtype=v.dtype)
    qg = torch.empty(TT, HV, K, device=dev, dtype=q.dtype)
    kg = torch.empty(TT, HV, K, device=dev, dtype=k.dtype)
    gc = torch.empty(NC, HV, K, device=dev, dtype=torch.float32)
    KPOW = triton.next_power_of_2(K)
    BK, BV = min(cfg.solve_BK, KPOW), min(cfg.solve_BK, triton.next_power_of_2(V))
    BKA, BKG = min(cfg.intra_BK, KPOW), min(cfg.gamma_BK, KPOW)
    BKR = min(cfg.intra_row_BK or KPOW, KPOW)
    # Gamma's row stride in the scratch: whole rows (the intra kernel reads K's power of two) and a multiple of
    # every K slice
    row = max(BK, BKA, KPOW)
    KP = triton.cdiv(K, row) * row
    # A_kk and its diagonal inverses (not needed when X is kept), and Gamma: float32 scratch per chunk and head
    a_scratch = torch.empty(NC, HV, C * C + C * BLOCK if kept is None else 1, device=dev, dtype=torch.float32)
    gamma = torch.empty(NC, HV, C, KP, device=dev, dtype=torch.float32)
    out = Intra(aqk, w, u, qg, kg, gc, gamma, x)
    if not NC:
        return out
    chunks = (table.chunk_seq, table.chunk_pos, table.cu)
    use_gate = opts.use_gate_in_kernel
    use_lb = use_gate and opts.lower_bound is not None
    lower_bound = float(opts.lower_bound) if use_lb else 0.0
    beta_flags = dict(BETA_SIGMOID=opts.use_beta_sigmoid_in_kernel, BETA_SCALE=2.0 if opts.allow_neg_eigval else 1.0)

    kda_gamma_kernel[(NC, HV, triton.cdiv(K, BKG))](
        g, A_log if A_log is not None else g, dt_bias if dt_bias is not None else g, gc, gamma, *chunks,
        lower_bound, HV=HV, K=K, C=C, KP=KP, BK=BKG, USE_GATE=use_gate, USE_LB=use_lb,
        HAS_A=use_gate and A_log is not None, HAS_BIAS=use_gate and dt_bias is not None, num_warps=GAMMA_WARPS)
    shift, check = factor_shift(use_lb, lower_bound)
    kda_intra_kernel[(C // BLOCK * NC, HV)](
        q, k, beta, aqk, qg, kg, w, a_scratch, gamma, *chunks, float(opts.scale), shift,
        H=H, HV=HV, K=K, C=C, KP=KP, BK=BKA, BKR=BKR, L2NORM=opts.use_qk_l2norm_in_kernel, **beta_flags,
        DOT_PREC=cfg.precision, CHECK=check, NUM_STAGES=INTRA_STAGES, NORMS_FIRST=cfg.intra_norms == "first",
        FORM_A=kept is None, num_warps=cfg.intra_warps)
    # register cap (NVIDIA only): trades spills for more programs per multiprocessor
    cap = {"maxnreg": cfg.solve_maxnreg} if cfg.solve_maxnreg and dev.type == "cuda" else {}
    mode = X_LOAD if kept is not None else X_STORE if keep_x else X_NONE
    kda_solve_kernel[(NC, HV)](
        w, v, beta, u, a_scratch, x if x is not None else a_scratch, *chunks, HV=HV, K=K, V=V, C=C, KP=KP,
        **beta_flags, BK=BK, BV=BV, DOT_PREC=cfg.precision, SOLVE_PREC=cfg.solve_precision,
        SOLVE_DIAG=cfg.solve_diag, NUM_STAGES=SOLVE_STAGES, X_MODE=mode.value, num_warps=cfg.solve_warps, **cap)
    return out
