"""Stage 1, third organisation (``intra_impl="split"``): the intra-chunk stage as three smaller kernels.

The "rows" and "fused" organisations (chunk_intra.py, chunk_intra_fused.py) run the whole stage in one
program per (chunk, value head).  On an H100 that program compiles to the register limit with spills,
only two fit on a multiprocessor, and each takes ~75 us mostly waiting on loads: the stage is bound by
latency, not by bandwidth or tensor cores.  Here the same work is cut into three kernels, each with a
smaller live set, and the part that dominates (A_kk / A_qk) gets C/16 times more programs:

1. ``_split_prep_kernel`` (grid: chunks x HV): L2-norm factors of q and k, Gamma (gate + chunk-local
   cumsum, float32) to a global float32 scratch, and the outputs that need no A:
   ``qg = q r_q exp(Gamma)``, ``kg = k r_k exp(Gamma_C - Gamma)``, ``gl = Gamma_C``.
2. ``_split_a_kernel`` (grid: (C/16 x chunks) x HV, row block fastest): program i builds row block i
   (16 rows) of A_kk (to the scratch, zeros above the diagonal included, so the inverse reads a full
   matrix) and of A_qk (to the output), reading Gamma and the norm factors back from the scratch.  Each
   row block picks its own path from its span ``max |Gamma_r - Gamma_ref|`` over its valid rows r
   (ref = its middle row 16 i + 8): one tensor-core product factored around the middle row
   (:func:`a_block_factored`; every factor <= exp(span) <= exp(SPAN_MAX), since only rows and columns
   inside block i can give a factor above 1, the earlier columns give exp(Gamma_ref - Gamma_s) <= 1), or
   the exact fallback (:func:`a_block_exact`: earlier columns factored around row 16 i, both factors <= 1,
   and the diagonal 16x16 block element-wise).  A chunk with one masked token (g = -1000) thus sends only
   the blocks whose span contains the jump down the slow path.
3. ``_split_solve_kernel`` (grid: chunks x HV): the blocked inverse (solve_tril.py) of A_kk from the
   scratch, then ``W = T (k r_k exp(Gamma))`` and ``U = T v``.

Splitting the A products over sub-chunk row blocks, each with its own decay reference, is the sub-chunk
idea of flash-linear-attention's KDA kernels; the code here is ours.  The cost is memory traffic: Gamma and
the norm factors make one round trip through global memory (written by 1, read by 2 and 3), A_kk one
more (written by 2, read by 3), and q/k are read again by 2 and k by 3; a later kernel finds little of
that in L2 at large shapes (estimate in docs/triton.md).  Same numerics and outputs as chunk_intra.py
(see its docstring); the scratch layout per (chunk, head) is the rows kernel's: A_kk ``[C, C]``,
``[C, 16]`` for the inverse's diagonal blocks, Gamma ``[C, KP]``, norm factors ``[2, C]``.

The A kernel has its own K-block width and warps (``intra_a_BK``, default 16, ``intra_a_warps``, default 4,
``intra_a_stages``): its register use grows fast with the width (ptxas, K = 128, sm_90: 116 registers at
16, 165-204 at 32, spills at 64), while prep and solve keep ``intra_BK`` / ``intra_warps``.  Inside the
exact fallback the off-diagonal product and the element-wise diagonal block are separate passes over K:
in one pass the kernel needed ~250 registers, in two ~165 (at BK 32).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .gate import L2NORM_EPS, SPAN_MAX, beta_act, chunk_beta, chunk_bounds, chunk_gamma, l2norm_factors
from .solve_tril import block_inverse, solve_diag, t_times_v


@triton.jit
def scratch_views(scratch, i_c, i_h, HV: tl.constexpr, C: tl.constexpr, KP: tl.constexpr):
    """The float32 scratch of chunk ``i_c`` and value head ``i_h`` ("rows", "split", "split2"; C^2 + 16 C +
    C KP + 2 C floats): ``base`` (A_kk ``[C, C]``, then ``[C, 16]`` for the inverse's diagonal blocks),
    ``s_g`` (Gamma ``[C, KP]``) and ``s_r`` (L2-norm factors of q and k, ``[2, C]``)."""
    base = scratch + (i_c.to(tl.int64) * HV + i_h) * (C * C + C * 16 + C * KP + 2 * C)
    s_g = base + C * C + C * 16
    return base, s_g, s_g + C * KP


@triton.jit
def row_norms(x, o_t, m_t, i_kh, H: tl.constexpr, K: tl.constexpr, R: tl.constexpr, BK: tl.constexpr):
    """``1 / sqrt(sum(x**2) + eps)`` of the rows ``o_t`` (``[R]``, valid where ``m_t``; others give
    1/sqrt(eps) and must not be used) of key head ``i_kh`` of ``x [TT, H, K]``."""
    s_x = tl.zeros([R], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_x = tl.load(x + o_t[:, None] * (H * K) + i_kh * K + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :],
                      other=0.0).to(tl.float32)
        s_x += tl.sum(b_x * b_x, 1)
    return tl.rsqrt(s_x + L2NORM_EPS)


@triton.jit
def block_outputs(qg, kg, ke, s_g, r_qi, r_ki, b_qi, b_ki, b_gi, t0, last, t_i, mi, o_k, i_h,
                  HV: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
    """Rows ``t_i`` (channels ``o_k``) of ``qg = q r_q exp(Gamma)``, ``kg = k r_k exp(Gamma_C - Gamma)`` and
    ``ke = k r_k exp(Gamma)`` from the raw rows ``b_qi``, ``b_ki``, their norm factors ``r_qi``, ``r_ki`` and
    their Gamma ``b_gi`` (every exponent <= 0 on valid rows); Gamma_C from the scratch."""
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
    """Row block ``i`` of A_kk (rows times ``r_k beta``, strictly causal, to the scratch at ``base``, zeros
    above the diagonal included) and of A_qk (rows times ``r_q scale``, causal, to ``aqk [TT, HV, C]``) from
    the raw products ``[16, C]`` and the rows' norm factors ``b_ri`` (q) and ``b_rki`` (k)."""
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
def _a_block_around(q, k, s_g, r_k, t0, eos, i, i_kh, REF: tl.constexpr, END: tl.constexpr,
                    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr,
                    DOT_PREC: tl.constexpr, NUM_STAGES: tl.constexpr, out):
    """Row block ``i`` (rows 16 i .. 16 i + 15) against columns s < 16 (i + ``END``) of
    ``sum_c x_r[c] D_rs[c] k_s[c] r_k[s]`` for x = k (first result) and x = q (second), ``[16, C]`` float32,
    without the row factors (norm, beta, scale) and without the causal mask, as one tensor-core product
    factored around row 16 i + ``REF``: ``exp(Gamma_r - Gamma_ref) * exp(Gamma_ref - Gamma_s)``.  ``i`` may be a
    constexpr (rows kernel) or a program id (split kernel); ``NUM_STAGES``: pipelining of the K loop (None:
    the compiler's default, as a plain ``range``).  ``out``: None, or ``(qg, kg, ke, r_qi, r_ki, last, i_h, HV)`` to
    also write the block's rows of ``qg = q r_q exp(Gamma)``, ``kg = k r_k exp(Gamma_C - Gamma)`` and
    ``ke = k r_k exp(Gamma)`` from the tiles this pass loads anyway ("split2")."""
    o_c = tl.arange(0, C)
    o_t = t0 + o_c
    m_t = o_t < eos
    o_b = tl.arange(0, BK)
    o_i = 16 * i + tl.arange(0, 16)
    t_i = t0 + o_i
    m_i = t_i < eos
    b_akk = tl.zeros([16, C], dtype=tl.float32)
    b_aqk = tl.zeros([16, C], dtype=tl.float32)
    for i_k in tl.range(0, tl.cdiv(K, BK), num_stages=NUM_STAGES):
        o_k = i_k * BK + o_b
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        mi = m_i[:, None] & m_k[None, :]
        ref = tl.load(s_g + (16 * i + REF) * KP + o_k)
        b_gi = tl.load(s_g + o_i[:, None] * KP + o_k[None, :])
        e_r = tl.where(mi, tl.exp(b_gi - ref[None, :]), 0.0)
        p_i = t_i[:, None] * (H * K) + i_kh * K + o_k[None, :]
        b_ki = tl.load(k + p_i, mask=mi, other=0.0).to(tl.float32)
        b_qi = tl.load(q + p_i, mask=mi, other=0.0).to(tl.float32)
        if out is not None:  # the block's rows of qg, kg, ke
            qg, kg, ke, r_qi, r_ki, last, i_h, HV = out
            block_outputs(qg, kg, ke, s_g, r_qi, r_ki, b_qi, b_ki, b_gi, t0, last, t_i, mi, o_k, i_h, HV, K, KP)
        b_ki = b_ki * e_r
        b_qi = b_qi * e_r
        # only the columns this block uses are read (rows s < 16 (i + END) of Gamma and k)
        m_s = (o_c < 16 * (i + END))[:, None] & m
        b_g = tl.load(s_g + o_c[:, None] * KP + o_k[None, :], mask=m_s, other=0.0)
        b_k = tl.load(k + o_t[:, None] * (H * K) + i_kh * K + o_k[None, :], mask=m_s, other=0.0)
        e_s = tl.where(m_s, tl.exp(ref[None, :] - b_g), 0.0)
        if r_k is not None:  # column norm factors (None: the caller scales the columns afterwards)
            b_ks = tl.trans(b_k.to(tl.float32) * r_k[:, None] * e_s)
        else:
            b_ks = tl.trans(b_k.to(tl.float32) * e_s)
        b_akk += tl.dot(b_ki, b_ks, input_precision=DOT_PREC)
        b_aqk += tl.dot(b_qi, b_ks, input_precision=DOT_PREC)
    return b_akk, b_aqk


@triton.jit
def a_block_factored(q, k, s_g, r_k, t0, eos, i, i_kh,
                     H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr,
                     DOT_PREC: tl.constexpr, NUM_STAGES: tl.constexpr, out=None):
    """Row block ``i`` against columns s < 16 (i + 1) (:func:`_a_block_around`), factored around the block's
    middle row: every factor <= exp(span of block i)."""
    return _a_block_around(q, k, s_g, r_k, t0, eos, i, i_kh, 8, 1, H, K, C, KP, BK, DOT_PREC,
                           NUM_STAGES, out)


@triton.jit
def a_block_exact(q, k, s_g, s_r, r_k, t0, eos, i, i_kh,
                  H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr,
                  DOT_PREC: tl.constexpr, NUM_STAGES: tl.constexpr, out=None):
    """Same result as :func:`a_block_factored` for a block whose span exceeds SPAN_MAX: columns s < 16 i as
    one product factored around row 16 i (``exp(Gamma_r - Gamma_16i)`` and ``exp(Gamma_16i - Gamma_s)``,
    both <= 1), the diagonal block element-wise (one column per step, every exponent <= 0 where kept)."""
    o_i = 16 * i + tl.arange(0, 16)
    # columns before the block (none for block 0): one product around the block's first row
    b_akk, b_aqk = _a_block_around(q, k, s_g, r_k, t0, eos, i, i_kh, 0, 0, H, K, C, KP, BK, DOT_PREC,
                                   NUM_STAGES, out)
    # diagonal block (a separate pass: fewer values live at once)
    r_cols = tl.full([16], 1.0, tl.float32)
    if r_k is not None:  # the columns' norm factors, else the caller scales afterwards
        r_cols = tl.load(s_r + C + o_i)
    d_kk, d_qk = diag_block_elementwise(q, k, s_g, r_cols, t0, eos, i, i_kh, H, K, C, KP, BK)
    return b_akk + d_kk, b_aqk + d_qk


@triton.jit
def diag_block_elementwise(q, k, s_g, r_cols, t0, eos, i, i_kh, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                           KP: tl.constexpr, BK: tl.constexpr):
    """Row block ``i`` of ``sum_c x_r[c] exp(Gamma_r[c] - Gamma_s[c]) k_s[c] r_cols[s]`` for x = k and x = q over
    the block's own columns s = 16 i + j (``[16, C]``, other columns 0), element-wise: one column per step,
    every exponent kept <= 0 (r >= s).  ``r_cols``: the norm factors of those 16 columns (or ones)."""
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


@triton.jit
def _split_prep_kernel(
    q, k, g, A_log, dt_bias, qg, kg, gl, scratch, chunk_seq, chunk_pos, cu, lower_bound,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
    L2NORM: tl.constexpr, USE_GATE: tl.constexpr, USE_LB: tl.constexpr, HAS_A: tl.constexpr,
    HAS_BIAS: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr, WRITE_QK: tl.constexpr = True,
    NORMS: tl.constexpr = True,
):
    """K1: norm factors (unless ``NORMS`` is off) and Gamma to scratch; gl; qg and kg (as the rows kernel's
    phases 1 and 4) unless ``WRITE_QK`` is off ("split2": the A kernel writes them and may take the norm
    factors itself)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_kh = i_h // (HV // H)
    t0, eos, last = chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C)
    base, s_g, s_r = scratch_views(scratch, i_c, i_h, HV, C, KP)
    o_c = tl.arange(0, C)
    o_t = t0 + o_c
    m_t = o_t < eos
    o_b = tl.arange(0, BK)

    if NORMS:
        r_q, r_k = l2norm_factors(q, k, o_t, m_t, i_kh, H, K, C, BK, L2NORM)
        tl.store(s_r + o_c, r_q)
        tl.store(s_r + C + o_c, r_k)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + o_b
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        b_g = chunk_gamma(g, A_log, dt_bias, lower_bound, o_t, m, i_h, o_k, m_k, HV, K,
                          USE_GATE, USE_LB, HAS_A, HAS_BIAS)
        tl.store(s_g + o_c[:, None] * KP + o_k[None, :], b_g)
        b_gl = tl.sum(tl.where((o_c == last - t0)[:, None], b_g, 0.0), 0)     # Gamma_C
        if WRITE_QK:
            p_qk = o_t[:, None] * (H * K) + i_kh * K + o_k[None, :]
            p_g = o_t[:, None] * (HV * K) + i_h * K + o_k[None, :]
            b_q = tl.load(q + p_qk, mask=m, other=0.0).to(tl.float32) * r_q[:, None]
            tl.store(qg + p_g, tl.where(m, b_q * tl.exp(b_g), 0.0).to(qg.dtype.element_ty), mask=m)
            b_k = tl.load(k + p_qk, mask=m, other=0.0).to(tl.float32) * r_k[:, None]
            tl.store(kg + p_g, tl.where(m, b_k * tl.exp(b_gl[None, :] - b_g), 0.0).to(kg.dtype.element_ty), mask=m)
        tl.store(gl + (i_c.to(tl.int64) * HV + i_h) * K + o_k, b_gl, mask=m_k)


@triton.jit
def _split_a_kernel(
    q, k, beta, aqk, scratch, chunk_seq, chunk_pos, cu, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
    BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr,
    DOT_PREC: tl.constexpr, NUM_STAGES: tl.constexpr, qg=None, kg=None, ke=None, OUT_PASS: tl.constexpr = 0,
    L2NORM: tl.constexpr = False, NORMS_IN_A: tl.constexpr = False,
):
    """K2: row block ``i`` of chunk ``i_c`` of A_kk (to scratch) and A_qk (to the output), its path chosen by
    its own span.  With ``OUT_PASS`` ("split2") also the block's rows of ``qg = q r_q exp(Gamma)``,
    ``kg = k r_k exp(Gamma_C - Gamma)`` and ``ke = k r_k exp(Gamma)`` (what W is made of), in the span pass
    (1, loading the rows again) or in the product pass (2, from its tiles; more registers).  With
    ``NORMS_IN_A`` the L2-norm factors (``L2NORM``) are computed here, from the rows the block uses, instead
    of being read from the scratch (prep then reads only g)."""
    # row block fastest: the C/16 programs of one chunk run together and share its Gamma, q, k through L2
    # (one flat axis, so the number of chunks keeps the 2^31 grid limit of axis 0)
    i, i_c, i_h = tl.program_id(0) % (C // 16), tl.program_id(0) // (C // 16), tl.program_id(1)
    i_kh = i_h // (HV // H)
    t0, eos, last = chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C)
    base, s_g, s_r = scratch_views(scratch, i_c, i_h, HV, C, KP)
    o_c = tl.arange(0, C)
    m_t = (t0 + o_c) < eos
    o_i = 16 * i + tl.arange(0, 16)
    t_i = t0 + o_i
    m_i = t_i < eos
    o_b = tl.arange(0, BK)

    if NORMS_IN_A:  # own rows here; the columns' factors scale A after the products (below)
        b_ri = tl.full([16], 1.0, tl.float32)
        b_rki = tl.full([16], 1.0, tl.float32)
        if L2NORM:
            b_ri = row_norms(q, t_i, m_i, i_kh, H, K, 16, BK)
            b_rki = row_norms(k, t_i, m_i, i_kh, H, K, 16, BK)
    else:
        b_ri = tl.load(s_r + o_i)
        b_rki = tl.load(s_r + C + o_i)
    # span of this block: largest |Gamma_r - Gamma at row 16 i + 8| over its valid rows and all channels
    b_span = tl.zeros([16, BK], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + o_b
        mi = m_i[:, None] & (o_k < K)[None, :]
        b_gi = tl.load(s_g + o_i[:, None] * KP + o_k[None, :])
        ref = tl.load(s_g + (16 * i + 8) * KP + o_k)
        b_span = tl.maximum(b_span, tl.where(mi, tl.abs(b_gi - ref[None, :]), 0.0))
        if OUT_PASS == 1:
            p_i = t_i[:, None] * (H * K) + i_kh * K + o_k[None, :]
            b_qi = tl.load(q + p_i, mask=mi, other=0.0).to(tl.float32)
            b_ki = tl.load(k + p_i, mask=mi, other=0.0).to(tl.float32)
            block_outputs(qg, kg, ke, s_g, b_ri, b_rki, b_qi, b_ki, b_gi, t0, last, t_i, mi, o_k, i_h, HV, K, KP)
    span = tl.max(tl.max(b_span, 1), 0)
    if NORMS_IN_A:  # the columns are scaled after the products (fewer values live in them)
        r_k = None
    else:
        r_k = tl.load(s_r + C + o_c)

    if OUT_PASS == 2:
        out = (qg, kg, ke, b_ri, b_rki, last, i_h, HV)
    else:
        out = None
    if span <= SPAN_MAX:
        b_akk, b_aqk = a_block_factored(q, k, s_g, r_k, t0, eos, i, i_kh, H, K, C, KP, BK, DOT_PREC, NUM_STAGES,
                                        out)
    else:
        b_akk, b_aqk = a_block_exact(q, k, s_g, s_r, r_k, t0, eos, i, i_kh, H, K, C, KP, BK, DOT_PREC,
                                       NUM_STAGES, out)

    if NORMS_IN_A and L2NORM:  # column factors: k rows s < 16 (i + 1), the ones this block uses
        r_s = row_norms(k, t0 + o_c, m_t & (o_c < 16 * (i + 1)), i_kh, H, K, C, BK)
        b_akk = b_akk * r_s[None, :]
        b_aqk = b_aqk * r_s[None, :]
    store_a_block(b_akk, b_aqk, base, aqk, beta, b_ri, b_rki, t0, eos, i, i_h, scale, HV, C, BETA_SIGMOID,
                  BETA_SCALE)


@triton.jit
def _split_solve_kernel(
    k, v, beta, w, u, scratch, chunk_seq, chunk_pos, cu,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr, KP: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, SOLVE_PREC: tl.constexpr,
    SOLVE_DIAG: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """K3: T = (I + A_kk)^-1 diag(beta) from the scratch, W = T (k r_k exp(Gamma)), U = T v."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_kh = i_h // (HV // H)
    t0, eos, last = chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C)
    base, s_g, s_r = scratch_views(scratch, i_c, i_h, HV, C, KP)
    o_c = tl.arange(0, C)
    o_t = t0 + o_c
    m_t = o_t < eos
    o_b = tl.arange(0, BK)

    b_beta = chunk_beta(beta, o_t, m_t, i_h, HV, BETA_SIGMOID, BETA_SCALE)
    b_m = block_inverse(base, b_beta, C, SOLVE_PREC, SOLVE_DIAG)

    r_k = tl.load(s_r + C + o_c)
    for i_k in tl.range(0, tl.cdiv(K, BK), num_stages=NUM_STAGES):
        o_k = i_k * BK + o_b
        m = m_t[:, None] & (o_k < K)[None, :]
        p_qk = o_t[:, None] * (H * K) + i_kh * K + o_k[None, :]
        p_g = o_t[:, None] * (HV * K) + i_h * K + o_k[None, :]
        b_k = tl.load(k + p_qk, mask=m, other=0.0).to(tl.float32) * r_k[:, None]
        b_g = tl.load(s_g + o_c[:, None] * KP + o_k[None, :])
        b_w = tl.dot(b_m, tl.where(m, b_k * tl.exp(b_g), 0.0), input_precision=DOT_PREC)
        tl.store(w + p_g, b_w.to(w.dtype.element_ty), mask=m)
    t_times_v(b_m, v, u, o_t, m_t, i_h, HV, V, BV, DOT_PREC, NUM_STAGES)


def launch_prep_and_a(q, k, g, beta, A_log, dt_bias, aqk, qg, kg, gl, scratch, table, flags: dict, scale: float,
                      lower_bound: float, KP: int, BK: int, BKA: int, config: dict, ke=None, out_pass: int = 0,
                      norms_in_a: bool = False):
    """Launch K1 (prep) and K2 (A by row block), the first two kernels of "split" and "split2".  ``flags``: the
    task constexprs shared with the one-kernel organisations (H, HV, K, V, C, L2NORM, USE_GATE, ...); ``KP``:
    row stride of Gamma in the scratch (a multiple of both K-block widths ``BK``, K1, and ``BKA``, K2).
    ``out_pass`` 0: prep writes qg and kg; 1 or 2: the A kernel writes them and ``ke`` (split2, in its span or
    product pass); ``norms_in_a``: the A kernel takes the L2-norm factors instead of prep."""
    NC, HV, C = table.num_chunks, flags["HV"], flags["C"]
    chunks = (table.chunk_seq, table.chunk_pos, table.cu)
    _split_prep_kernel[(NC, HV)](
        q, k, g, A_log, dt_bias, qg, kg, gl, scratch, *chunks, lower_bound,
        H=flags["H"], HV=HV, K=flags["K"], C=C, L2NORM=flags["L2NORM"], USE_GATE=flags["USE_GATE"],
        USE_LB=flags["USE_LB"], HAS_A=flags["HAS_A"], HAS_BIAS=flags["HAS_BIAS"], KP=KP, BK=BK,
        WRITE_QK=out_pass == 0, NORMS=not norms_in_a, num_warps=config.get("intra_warps", 4))
    outputs = dict(qg=qg, kg=kg, ke=ke) if out_pass else {}
    _split_a_kernel[(C // 16 * NC, HV)](
        q, k, beta, aqk, scratch, *chunks, scale,
        H=flags["H"], HV=HV, K=flags["K"], C=C, BETA_SIGMOID=flags["BETA_SIGMOID"], BETA_SCALE=flags["BETA_SCALE"],
        KP=KP, BK=BKA, DOT_PREC=config.get("intra_precision", "tf32"), NUM_STAGES=config.get("intra_a_stages"),
        **outputs, OUT_PASS=out_pass, L2NORM=flags["L2NORM"], NORMS_IN_A=norms_in_a,
        num_warps=config.get("intra_a_warps", 4))


def launch_split(q, k, v, g, beta, A_log, dt_bias, aqk, w, u, qg, kg, gl, scratch, table, flags: dict,
                 scale: float, lower_bound: float, KP: int, BK: int, BKA: int, BV: int, config: dict, launch: dict):
    """Launch K1, K2 (:func:`launch_prep_and_a`) and K3 on one stream (each reads what the previous wrote to
    ``scratch``); ``launch``: extra launch options of K3 (the register cap)."""
    launch_prep_and_a(q, k, g, beta, A_log, dt_bias, aqk, qg, kg, gl, scratch, table, flags, scale, lower_bound,
                      KP, BK, BKA, config)
    _split_solve_kernel[(table.num_chunks, flags["HV"])](
        k, v, beta, w, u, scratch, table.chunk_seq, table.chunk_pos, table.cu,
        H=flags["H"], HV=flags["HV"], K=flags["K"], V=flags["V"], C=flags["C"], BETA_SIGMOID=flags["BETA_SIGMOID"],
        BETA_SCALE=flags["BETA_SCALE"], KP=KP, BK=BK, BV=BV, DOT_PREC=config.get("intra_precision", "tf32"),
        SOLVE_PREC=config.get("solve_precision", "tf32"),
        SOLVE_DIAG=solve_diag(config), NUM_STAGES=config.get("intra_stages", 1),
        num_warps=config.get("intra_warps", 4), **launch)
