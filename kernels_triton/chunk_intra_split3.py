"""Stage 1, fifth organisation (``intra_impl="split3"``, the default): a Gamma kernel, an A kernel whose 16-row
blocks are factored around their *first* row, and split2's solve kernel (chunk_intra_split2.py).

Why.  The other organisations factor each 16-row block around its *middle* row, a later token for the block's
first eight rows, so those rows' entries depend on a later token's gate through rounding:
``tests/test_triton_fwd.py`` found outputs moving by ~1e-7 when only later tokens changed (design.md section 6
asks for none).  Split2's A kernel also walked K four times in 32-wide slices (norms, span + outputs, products,
column norms), some sixteen dependent rounds of loads per program (1.62 ms at B8·T4096·H32).

Program (row block i, chunk, value head) of the A kernel makes two rounds over K:

1. its own 16 rows of q, k and Gamma (whole rows by default, ``intra_a_row_BK``): their L2-norm factors,
   the outputs ``qg = q r_q exp(Gamma)``, ``kg = k r_k exp(Gamma_C - Gamma)`` and ``ke = k r_k exp(Gamma)``,
   and how far each row's Gamma is from the first row's (``CHECK``);
2. one ``[16, BK] x [BK, C]`` product per K slice of its rows against the columns s < 16 (i + 1) (the tiles
   above the diagonal are masked to zeros on store; the inverse reads a full matrix), then the columns' norm
   factors (``intra_a_norms="split"``; ``"first"`` takes them in one pass before round 1).

Numerics.  Every row block is one tensor-core product factored around the block's first row ``f = 16 i`` and a
shift ``d``: ``exp(Gamma_r - Gamma_f + d) * exp(Gamma_f - d - Gamma_s)``.  Entry (r, s) then depends only on
tokens <= max(r, s), so causal entries never see a later token, bit for bit (the reference of
flash-linear-attention's safe-gate sub-chunk kernel is the first row too, shifted toward the middle; see its
``chunk_kda_fwd_intra`` notes).  Both factors stay within exp(+-SPAN_MAX) when ``Gamma_r - Gamma_f`` lies in
``[-SPAN_MAX - d, SPAN_MAX - d]`` for every row up to r:

* safe gate (``g = lower_bound * sigmoid(.)``, |lower_bound| <= 8): 15 tokens move Gamma by at most
  15 |lower_bound|, so ``d = -7.5 lower_bound`` centres the range and no row is ever checked (``CHECK`` off);
* otherwise ``d = SPAN_MAX / 2`` (factors in range for up to 90 of decay over the block) and each row is
  checked against the rows before it; rows out of range (e.g. after a masked token, g = -1000) take their
  diagonal tile element-wise, every exponent <= 0 (:func:`chunk_intra_split.diag_block_elementwise`).  The
  choice is per row and looks only at earlier rows, so it is causal too.  Tiles left of the diagonal need no check: with g <= 0 both
  factors are <= exp(d) there and an underflowed factor means an entry below exp(-SPAN_MAX / 2).

The Gamma kernel writes Gamma (float32) to the scratch and Gamma_C to ``gl``; the solve kernel is split2's
(inverse, ``W = T ke`` in place, ``U = T v``).  Computing Gamma inside the A kernel instead (no scratch) was
1.8-1.9x slower on the H100 (docs/triton.md).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .chunk_intra_split import block_outputs, diag_block_elementwise, row_norms, scratch_views, store_a_block
from .gate import SPAN_MAX, chunk_bounds, chunk_gamma
from .chunk_intra_split2 import _split2_solve_kernel
from .solve_tril import solve_diag

# how the A kernel takes the L2-norm factors (config intra_a_norms): "first", one pass before everything for its
# q rows and all the k rows it uses (its own k rows' factors taken from those), or "split", its own rows first
# and the columns' in a pass after the products
NORM_PASSES = ("first", "split")
# largest |lower_bound| of the safe gate for which no row needs the range check (7.5 |lower_bound| <= SPAN_MAX)
SAFE_BOUND = 8.0


@triton.jit
def _gamma_kernel(
    g, A_log, dt_bias, gl, scratch, chunk_seq, chunk_pos, cu, lower_bound,
    HV: tl.constexpr, K: tl.constexpr, C: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr,
    USE_GATE: tl.constexpr, USE_LB: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Prep of "split3": Gamma (gate + chunk-local cumsum, float32) of channels ``BK * program_id(2) + [0, BK)``
    of one chunk and value head to the scratch, and Gamma_C to ``gl``.  One K slice per program: split's prep
    walks the slices in turn (4 at K = 128) and waits on each load."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos, last = chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C)
    base, s_g, s_r = scratch_views(scratch, i_c, i_h, HV, C, KP)
    o_c = tl.arange(0, C)
    o_t = t0 + o_c
    o_k = tl.program_id(2) * BK + tl.arange(0, BK)
    m_k = o_k < K
    m = (o_t < eos)[:, None] & m_k[None, :]
    b_g = chunk_gamma(g, A_log, dt_bias, lower_bound, o_t, m, i_h, o_k, m_k, HV, K, USE_GATE, USE_LB, HAS_A, HAS_BIAS)
    tl.store(s_g + o_c[:, None] * KP + o_k[None, :], b_g)
    tl.store(gl + (i_c.to(tl.int64) * HV + i_h) * K + o_k, tl.sum(tl.where((o_c == last - t0)[:, None], b_g, 0.0), 0),
             mask=m_k)


@triton.jit
def _split3_a_kernel(
    q, k, beta, aqk, qg, kg, ke, scratch, chunk_seq, chunk_pos, cu, scale, shift,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, C: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr,
    BKR: tl.constexpr, L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr,
    DOT_PREC: tl.constexpr, CHECK: tl.constexpr, NUM_STAGES: tl.constexpr, NORMS_FIRST: tl.constexpr,
):
    """Row block ``i`` of chunk ``i_c``: its rows of qg, kg, ke, and its rows of A_kk (scratch, zeros above the
    diagonal) and A_qk.  ``BKR``: K-slice of the first round over the block's own rows (whole rows when
    >= K); ``BK``: K-slice of the products; ``shift``: d above; Gamma from the scratch (:func:`_gamma_kernel`)."""
    # row block fastest: the C/16 programs of one chunk run together and share its k and Gamma through L2
    i, i_c, i_h = tl.program_id(0) % (C // 16), tl.program_id(0) // (C // 16), tl.program_id(1)
    i_kh = i_h // (HV // H)
    t0, eos, last = chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C)
    base, s_g, s_r = scratch_views(scratch, i_c, i_h, HV, C, KP)
    o_16 = tl.arange(0, 16)
    o_i = 16 * i + o_16
    t_i = t0 + o_i
    m_i = t_i < eos
    o_c = tl.arange(0, C)
    m_t = (t0 + o_c) < eos

    # round 1: the block's own rows: norm factors, then qg / kg / ke and (CHECK) how far each row's Gamma is
    # from the first row's, in K slices of BKR (whole rows when BKR >= K)
    cols = m_t & (o_c < 16 * (i + 1))   # the columns this block uses: rows s < 16 (i + 1), its own included
    r_q = tl.full([16], 1.0, tl.float32)
    r_k = tl.full([16], 1.0, tl.float32)
    r_s = tl.full([C], 1.0, tl.float32)
    if L2NORM and NORMS_FIRST:
        # before everything, the norm factors of the block's q rows and of every k row it uses as a column; its
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
        if CHECK:
            b_fr = tl.load(s_g + 16 * i * KP + o_r, mask=o_r < K, other=0.0)
            out = tl.maximum(out, tl.max(tl.where(mr, tl.abs(b_g - b_fr[None, :] + shift), 0.0), 1))

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
    store_a_block(b_akk, b_aqk, base, aqk, beta, r_q, r_k, t0, eos, i, i_h, scale, HV, C, BETA_SIGMOID, BETA_SCALE)


def factor_shift(flags: dict, lower_bound: float) -> tuple[float, bool]:
    """``(d, CHECK)`` of the A kernel: the safe gate with |lower_bound| <= SAFE_BOUND needs no range check."""
    if flags["USE_LB"] and abs(lower_bound) <= SAFE_BOUND:
        return -7.5 * lower_bound, False
    return SPAN_MAX.value / 2, True


def launch_split3(q, k, v, g, beta, A_log, dt_bias, aqk, w, u, qg, kg, gl, scratch, table, flags: dict,
                  scale: float, lower_bound: float, KP: int, BK: int, BKA: int, BV: int, config: dict, launch: dict):
    """Launch this file's Gamma kernel (Gamma to the scratch, gl) and A kernel (qg, kg, ke into ``w``, A_kk,
    A_qk) and split2's solve kernel on one stream; ``KP``: Gamma's row stride, a multiple of ``BK`` and of K's power of
    two; other arguments as :func:`chunk_intra_split.launch_split`."""
    NC, HV, C, K = table.num_chunks, flags["HV"], flags["C"], flags["K"]
    chunks = (table.chunk_seq, table.chunk_pos, table.cu)
    shift, check = factor_shift(flags, lower_bound)
    norms = config.get("intra_a_norms", "split")
    if norms not in NORM_PASSES:
        raise ValueError(f"intra_a_norms must be one of {NORM_PASSES}, got {norms!r}")
    prec = config.get("intra_precision", "tf32")
    BKG = min(config.get("intra_prep_BK", 32), triton.next_power_of_2(K))
    _gamma_kernel[(NC, HV, triton.cdiv(K, BKG))](
        g, A_log, dt_bias, gl, scratch, *chunks, lower_bound, HV=HV, K=K, C=C, KP=KP, BK=BKG,
        USE_GATE=flags["USE_GATE"], USE_LB=flags["USE_LB"], HAS_A=flags["HAS_A"], HAS_BIAS=flags["HAS_BIAS"],
        num_warps=config.get("intra_prep_warps", 4))
    # the block's own rows in K slices of BKR; default whole rows (one round of loads, the fastest measured)
    BKR = min(config.get("intra_a_row_BK") or triton.next_power_of_2(K), triton.next_power_of_2(K))
    _split3_a_kernel[(C // 16 * NC, HV)](
        q, k, beta, aqk, qg, kg, w, scratch, *chunks, scale, shift,
        H=flags["H"], HV=HV, K=K, C=C, KP=KP, BK=BKA, BKR=BKR, L2NORM=flags["L2NORM"],
        BETA_SIGMOID=flags["BETA_SIGMOID"], BETA_SCALE=flags["BETA_SCALE"], DOT_PREC=prec, CHECK=check,
        NUM_STAGES=config.get("intra_a_stages", 1), NORMS_FIRST=norms == "first",
        num_warps=config.get("intra_a_warps", 4))
    _split2_solve_kernel[(NC, HV)](
        w, v, beta, u, scratch, *chunks, HV=HV, K=K, V=flags["V"], C=C, KP=KP, BETA_SIGMOID=flags["BETA_SIGMOID"],
        BETA_SCALE=flags["BETA_SCALE"], BK=BK, BV=BV, DOT_PREC=prec, SOLVE_PREC=config.get("solve_precision", "tf32"),
        SOLVE_DIAG=solve_diag(config),
        NUM_STAGES=config.get("intra_stages", 1), num_warps=config.get("intra_warps", 4), **launch)
