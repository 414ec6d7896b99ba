"""Stage 1 of the Triton chunkwise forward: everything that stays inside one chunk (design.md section 1).

One program per (chunk, value head) applies the prologues (gate + chunk-local cumsum ``Gamma``, q/k L2 norm,
beta activation; gate.py) and computes:

    A_kk[r,s] = beta_r sum_c k_r[c] exp(Gamma_r[c] - Gamma_s[c]) k_s[c]   (s < r)
    A_qk[r,s] = scale  sum_c q_r[c] exp(Gamma_r[c] - Gamma_s[c]) k_s[c]   (s <= r)
    M = (I + A_kk)^-1,  W = M diag(beta) (k * exp(Gamma)),  U = M diag(beta) v
    qg = q * exp(Gamma),  kg = k * exp(Gamma_C - Gamma),  gl = Gamma_C     (for chunk_o and chunk_state)

Numerics (never exp(-Gamma) alone):

* Row block i (16 rows) against columns s < 16 (i + 1) is one tensor-core product factored around the
  block's middle row: ``exp(Gamma_r - Gamma_ref) * exp(Gamma_ref - Gamma_s)`` (the sub-chunk idea of
  flash-linear-attention's KDA kernels).  Every factor is <= exp(span) with ``span`` the largest
  ``|Gamma - Gamma_ref|`` over the block (8 tokens of decay either side; <= 40 with the safe gate's
  lower_bound = -5); this path is taken when span <= SPAN_MAX, so no causal entry overflows, and a factor
  that underflows multiplies one <= exp(SPAN_MAX), i.e. the true value is below exp(-27).
* Otherwise (e.g. masked tokens with g = -1000) the off-diagonal blocks use the reference row 16 i (both
  factors <= 1) and the diagonal blocks are computed element-wise, one column of every block per step.
* The inverse is blocked (solve_tril.py): 16x16 diagonal blocks by forward substitution, then
  (I + A_kk)^-1 = (I - N)(I + N^2) Dinv with N = Dinv A_off.

Four organisations share these numerics (``intra_impl`` in the config): "rows" (this file) keeps
Gamma and A in a per-program scratch and builds A one 16-row block at a time; "fused"
(chunk_intra_fused.py) keeps [C, C] accumulators in registers; "split" (chunk_intra_split.py) runs the
stage as three kernels (prologue + qg/kg; A by row block, C/16 programs per chunk and head, each block
choosing its own path; inverse + W/U) for more parallelism and fewer registers per program; "split2"
(chunk_intra_split2.py, the default) is "split" with qg, kg and ``k r_k exp(Gamma)`` written by the A
kernel, so the solve kernel reads neither Gamma nor k.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_intra_fused import _chunk_intra_fused_kernel
from .chunk_intra_split import a_block_factored, launch_split, scratch_views, store_a_block
from .chunk_intra_split2 import NORM_PLACES, launch_split2
from .gate import SPAN_MAX, beta_act, chunk_beta, chunk_bounds, chunk_gamma, interpreting, l2norm_factors
from .solve_tril import block_inverse, t_times_v

BLOCK = 16         # diagonal sub-block size of the blocked inverse
IMPLS = ("rows", "fused", "split", "split2")  # organisations of the stage (config key intra_impl)
# "split" organisation (intra_BK, intra_warps: prep and solve kernels; intra_a_BK, intra_a_warps: the A kernel).
# Chosen by ptxas register counts (K = 128, bf16, sm_90, Triton 3.6): the A kernel uses 116 registers at
# BK 16 / 4 warps (80 at 8 warps), 165-204 at BK 32, 240 at BK 16 / 2 warps (so 2 warps is left out) and
# spills at BK 64; at BK 64 the prep and solve kernels reach 255 registers and spill, so BK 64 is left out.
SPLIT_SHAPES = [(32, 4, 16, 4), (32, 8, 16, 4), (32, 4, 16, 8), (32, 4, 32, 4), (16, 4, 16, 4), (32, 8, 32, 8)]


# "split2" (chunk_intra_split2.py): (intra_a_BK, intra_a_warps, intra_a_stages, intra_a_outputs) of its A
# kernel; the first is the default.  Measured on the H100 (bench/kernel_breakdown.py, B2·T8192·H16, A kernel):
# BK 32 / stages 1 349 µs, BK 32 / compiler's pipelining 440, BK 16 / stages 1 469, outputs written in the
# product pass 384, BK 32 / 8 warps 606, BK 64 / 8 warps 562 (see docs/triton.md).
SPLIT2_SHAPES = [(32, 4, 1, "span"), (16, 4, 1, "span"), (32, 4, None, "span"), (32, 4, 1, "main"),
                 (64, 8, 1, "span")]


def get_configs() -> list[dict]:
    """Search space of this stage: kernel organisation (``intra_impl``: "rows", "fused", "split" or
    "split2"), K/V-block width, warps, pipelining (the split organisations' A kernel has its own
    ``intra_a_BK``, ``intra_a_warps`` and ``intra_a_stages``, None = the compiler's; split2's A kernel writes
    qg/kg/ke in its span pass or its product pass, ``intra_a_outputs``, and takes the q/k L2-norm factors
    itself or from prep, ``intra_norms``), a register cap (``intra_maxnreg``,
    NVIDIA; None = compiler's choice; split/split2: their solve kernel only), and the precision of the
    float32 products (A and W/U: ``intra_precision``; the inverse: ``solve_precision``)."""
    return ([{"intra_impl": "split2", "intra_a_BK": abk, "intra_a_warps": aw, "intra_a_stages": st,
              "intra_a_outputs": where, "intra_norms": norms} for norms in NORM_PLACES
             for abk, aw, st, where in SPLIT2_SHAPES]
            + [{"intra_impl": impl, "intra_BK": bk, "intra_warps": w, "intra_stages": 1}
               for impl in ("rows", "fused") for bk in (32, 64) for w in (4, 8)]
            + [{"intra_impl": "split", "intra_BK": bk, "intra_warps": w, "intra_a_BK": abk, "intra_a_warps": aw,
                "intra_a_stages": None, "intra_stages": 1} for bk, w, abk, aw in SPLIT_SHAPES]
            + [{"intra_maxnreg": r} for r in (128, 168)]
            + [{"intra_precision": p, "solve_precision": sp} for p in ("tf32", "tf32x3", "ieee")
               for sp in ("tf32", "ieee")])


# "split2" measured fastest on the H100 (bench/RESULTS.md, session 3): intra stage 0.87-0.88 ms at B2·T8192·H16
# (norms in the A kernel: prep 101 + A 418 + solve 356 µs; in prep: 175 + 349 + 355) against 1.11 ms for
# "split" and 1.22 for "rows"; norms in A won at every standard shape in the same run (run M)
DEFAULT_CONFIG = {"intra_impl": "split2", "intra_BK": 32, "intra_warps": 4, "intra_a_BK": 32, "intra_a_warps": 4,
                  "intra_a_stages": 1, "intra_a_outputs": "span", "intra_norms": "a", "intra_stages": 1,
                  "intra_precision": "tf32", "solve_precision": "tf32"}


@triton.jit
def _a_factored(q, k, beta, aqk, base, s_g, s_r, t0, eos, i_h, i_kh, scale,
                H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, C: tl.constexpr, KP: tl.constexpr,
                BK: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr, DOT_PREC: tl.constexpr):
    """A_kk (to scratch) and A_qk (to the output) by row block, each block one product factored around
    its middle row (every factor <= exp(SPAN_MAX))."""
    NB: tl.constexpr = C // 16
    r_k = tl.load(s_r + C + tl.arange(0, C))
    for i in tl.static_range(NB):
        o_i = 16 * i + tl.arange(0, 16)
        b_akk, b_aqk = a_block_factored(q, k, s_g, r_k, t0, eos, i, i_kh, H, K, C, KP, BK, DOT_PREC, None)
        store_a_block(b_akk, b_aqk, base, aqk, beta, tl.load(s_r + o_i), tl.load(s_r + C + o_i), t0, eos, i, i_h,
                      scale, HV, C, BETA_SIGMOID, BETA_SCALE)


@triton.jit
def _a_elementwise(q, k, beta, aqk, base, s_g, s_r, t0, eos, i_h, i_kh, scale,
                H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, C: tl.constexpr, KP: tl.constexpr,
                BK: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr, DOT_PREC: tl.constexpr):
    """A_kk and A_qk when some block decays by more than SPAN_MAX: off-diagonal blocks around row 16 i
    (both factors <= 1), diagonal blocks element-wise, one column of every block per step."""
    NB: tl.constexpr = C // 16
    o_c = tl.arange(0, C)
    o_t = t0 + o_c
    m_t = o_t < eos
    blk = o_c // 16
    o_b = tl.arange(0, BK)
    r_q = tl.load(s_r + o_c)
    r_k = tl.load(s_r + C + o_c)
    # strong decay: off-diagonal blocks around row 16 i (both factors <= 1), diagonal blocks element-wise
    b_akk = tl.zeros([C, C], dtype=tl.float32)
    b_aqk = tl.zeros([C, C], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + o_b
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        p_qk = o_t[:, None] * (H * K) + i_kh * K + o_k[None, :]
        b_k = tl.load(k + p_qk, mask=m, other=0.0).to(tl.float32) * r_k[:, None]
        b_q = tl.load(q + p_qk, mask=m, other=0.0).to(tl.float32) * r_q[:, None]
        b_g = tl.load(s_g + o_c[:, None] * KP + o_k[None, :])
        for i in tl.static_range(1, NB):
            live = t0 + 16 * i < eos
            ref = tl.load(s_g + (16 * i) * KP + o_k)
            e_r = tl.where((blk == i)[:, None] & m, tl.exp(b_g - ref[None, :]), 0.0)
            e_s = tl.where((o_c < 16 * i)[:, None] & m & live, tl.exp(ref[None, :] - b_g), 0.0)
            b_ks = tl.trans(b_k * e_s)
            b_akk += tl.dot(b_k * e_r, b_ks, input_precision=DOT_PREC)
            b_aqk += tl.dot(b_q * e_r, b_ks, input_precision=DOT_PREC)
        for j in range(0, 16):
            o_s = blk * 16 + j
            m_s = (t0 + o_s) < eos
            m_sk = m_s[:, None] & m_k[None, :]
            b_gj = tl.load(s_g + o_s[:, None] * KP + o_k[None, :])
            b_kj = tl.load(k + (t0 + o_s)[:, None] * (H * K) + i_kh * K + o_k[None, :], mask=m_sk,
                           other=0.0).to(tl.float32) * tl.load(s_r + C + o_s)[:, None]
            causal = ((o_c % 16) >= j) & m_t & m_s
            b_kd = b_kj * tl.where(causal[:, None] & m_k[None, :], tl.exp(b_g - b_gj), 0.0)
            sel = o_c[None, :] == o_s[:, None]
            b_akk += tl.where(sel, tl.sum(b_k * b_kd, 1)[:, None], 0.0)
            b_aqk += tl.where(sel, tl.sum(b_q * b_kd, 1)[:, None], 0.0)
    b_beta = beta_act(tl.load(beta + o_t * HV + i_h, mask=m_t, other=0.0), BETA_SIGMOID, BETA_SCALE)
    valid = m_t[:, None] & m_t[None, :]
    b_akk = tl.where((o_c[:, None] > o_c[None, :]) & valid, b_akk * b_beta[:, None], 0.0)
    b_aqk = tl.where((o_c[:, None] >= o_c[None, :]) & valid, b_aqk * scale, 0.0)
    tl.store(base + o_c[:, None] * C + o_c[None, :], b_akk)
    tl.store(aqk + o_t[:, None] * (HV * C) + i_h * C + o_c[None, :], b_aqk.to(aqk.dtype.element_ty),
             mask=m_t[:, None])


@triton.jit
def _chunk_intra_rows_kernel(
    q, k, v, g, beta, A_log, dt_bias, aqk, w, u, qg, kg, gl, scratch, chunk_seq, chunk_pos, cu, scale, lower_bound,
    # task config
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    L2NORM: tl.constexpr, USE_GATE: tl.constexpr, USE_LB: tl.constexpr, HAS_A: tl.constexpr,
    HAS_BIAS: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr,
    # kernel config
    BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, SOLVE_PREC: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Same outputs as the fused kernel, organised to keep few values live: Gamma goes through scratch
    (one scan per channel block, no recomputation, reference rows read back instead of reduced), and A is
    built one 16-row block at a time ([16, C] products instead of masked [C, C] ones)."""
    KP: tl.constexpr = ((K + BK - 1) // BK) * BK
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_kh = i_h // (HV // H)
    t0, eos, last = chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C)
    base, s_g, s_r = scratch_views(scratch, i_c, i_h, HV, C, KP)

    o_c = tl.arange(0, C)
    o_t = t0 + o_c
    m_t = o_t < eos
    blk = o_c // 16
    o_b = tl.arange(0, BK)

    # ---- phase 1: L2-norm factors, Gamma (gate + scan) to scratch
    r_q, r_k = l2norm_factors(q, k, o_t, m_t, i_kh, H, K, C, BK, L2NORM)
    tl.store(s_r + o_c, r_q)
    tl.store(s_r + C + o_c, r_k)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + o_b
        m_k = o_k < K
        b_g = chunk_gamma(g, A_log, dt_bias, lower_bound, o_t, m_t[:, None] & m_k[None, :], i_h, o_k, m_k, HV, K,
                          USE_GATE, USE_LB, HAS_A, HAS_BIAS)
        tl.store(s_g + o_c[:, None] * KP + o_k[None, :], b_g)
    tl.debug_barrier()

    # largest |Gamma - Gamma at the middle row of its 16-row block|: picks the path below
    b_span = tl.zeros([C, BK], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + o_b
        m = m_t[:, None] & (o_k < K)[None, :]
        b_g = tl.load(s_g + o_c[:, None] * KP + o_k[None, :])
        b_gref = tl.load(s_g + (blk * 16 + 8)[:, None] * KP + o_k[None, :])
        b_span = tl.maximum(b_span, tl.where(m, tl.abs(b_g - b_gref), 0.0))
    span = tl.max(tl.max(b_span, 1), 0)

    # ---- phase 2: A_kk (to scratch) and A_qk (to the output), one 16-row block at a time
    if span <= SPAN_MAX:
        _a_factored(q, k, beta, aqk, base, s_g, s_r, t0, eos, i_h, i_kh, scale, H, HV, K, C, KP, BK, BETA_SIGMOID,
                    BETA_SCALE, DOT_PREC)
    else:
        _a_elementwise(q, k, beta, aqk, base, s_g, s_r, t0, eos, i_h, i_kh, scale, H, HV, K, C, KP, BK, BETA_SIGMOID,
                       BETA_SCALE, DOT_PREC)
    tl.debug_barrier()

    # ---- phase 3: T = (I + A_kk)^-1 diag(beta)
    b_beta = chunk_beta(beta, o_t, m_t, i_h, HV, BETA_SIGMOID, BETA_SCALE)
    b_m = block_inverse(base, b_beta, C, SOLVE_PREC)

    # ---- phase 4: W = T (k * exp(Gamma)), U = T v, and q * exp(Gamma), k * exp(Gamma_C - Gamma), Gamma_C
    for i_k in tl.range(0, tl.cdiv(K, BK), num_stages=NUM_STAGES):
        o_k = i_k * BK + o_b
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        p_qk = o_t[:, None] * (H * K) + i_kh * K + o_k[None, :]
        p_g = o_t[:, None] * (HV * K) + i_h * K + o_k[None, :]
        b_k = tl.load(k + p_qk, mask=m, other=0.0).to(tl.float32) * r_k[:, None]
        b_g = tl.load(s_g + o_c[:, None] * KP + o_k[None, :])
        b_w = tl.dot(b_m, tl.where(m, b_k * tl.exp(b_g), 0.0), input_precision=DOT_PREC)
        tl.store(w + p_g, b_w.to(w.dtype.element_ty), mask=m)
    for i_k in range(0, tl.cdiv(K, BK)):  # separate pass: fewer tiles live at once
        o_k = i_k * BK + o_b
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        p_qk = o_t[:, None] * (H * K) + i_kh * K + o_k[None, :]
        p_g = o_t[:, None] * (HV * K) + i_h * K + o_k[None, :]
        b_g = tl.load(s_g + o_c[:, None] * KP + o_k[None, :])
        b_q = tl.load(q + p_qk, mask=m, other=0.0).to(tl.float32) * r_q[:, None]
        tl.store(qg + p_g, tl.where(m, b_q * tl.exp(b_g), 0.0).to(qg.dtype.element_ty), mask=m)
        b_gl = tl.load(s_g + (last - t0) * KP + o_k)
        b_k = tl.load(k + p_qk, mask=m, other=0.0).to(tl.float32) * r_k[:, None]
        tl.store(kg + p_g, tl.where(m, b_k * tl.exp(b_gl[None, :] - b_g), 0.0).to(kg.dtype.element_ty), mask=m)
        tl.store(gl + (i_c.to(tl.int64) * HV + i_h) * K + o_k, b_gl, mask=m_k)
    t_times_v(b_m, v, u, o_t, m_t, i_h, HV, V, BV, DOT_PREC, NUM_STAGES)


def chunk_intra(q, k, v, g, beta, A_log, dt_bias, opts, table, config: dict):
    """Run the intra-chunk stage (prologues fused) on flat tensors ``q, k [TT, H, K]``, ``v [TT, HV, V]``,
    ``g [TT, HV, K]`` (log decay, or the raw gate with ``use_gate_in_kernel``), ``beta [TT, HV]``.

    Returns ``(aqk [TT, HV, C], w, u, qg, kg, gl)``: A_qk (scaled, causal, v's dtype), W ``[TT, HV, K]``
    (k's dtype), U ``[TT, HV, V]`` (v's dtype), ``qg = q * exp(Gamma)`` and ``kg = k * exp(Gamma_C - Gamma)``
    ``[TT, HV, K]`` (q's / k's dtype), and ``gl = Gamma_C [chunks, HV, K]`` (float32).
    """
    TT, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    C = table.chunk_size
    BK = min(config.get("intra_BK", 64), triton.next_power_of_2(K))
    BV = min(config.get("intra_BK", 64), triton.next_power_of_2(V))
    dev = q.device
    aqk = torch.empty(TT, HV, C, device=dev, dtype=v.dtype)
    w = torch.empty(TT, HV, K, device=dev, dtype=k.dtype)
    u = torch.empty(TT, HV, V, device=dev, dtype=v.dtype)
    qg = torch.empty(TT, HV, K, device=dev, dtype=q.dtype)
    kg = torch.empty(TT, HV, K, device=dev, dtype=k.dtype)
    gl = torch.empty(table.num_chunks, HV, K, device=dev, dtype=torch.float32)
    if table.num_chunks:
        impl = config.get("intra_impl", "rows")
        if impl not in IMPLS:
            raise ValueError(f"intra_impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
        # split: its A kernel has its own K-block width; Gamma's row stride in the scratch fits both
        BKA = min(config.get("intra_a_BK", 16), triton.next_power_of_2(K))
        KP = triton.cdiv(K, max(BK, BKA)) * max(BK, BKA) if impl in ("split", "split2") else triton.cdiv(K, BK) * BK
        per_program = C * C + C * BLOCK + (2 * C * BK if impl == "fused" else C * KP + 2 * C)
        scratch = torch.empty(table.num_chunks * HV * per_program, device=dev, dtype=torch.float32)
        # register cap (NVIDIA): trades spills for more programs per multiprocessor
        launch = {"maxnreg": config["intra_maxnreg"]} if config.get("intra_maxnreg") and not interpreting() else {}
        use_gate = opts.use_gate_in_kernel
        flags = dict(H=H, HV=HV, K=K, V=V, C=C, L2NORM=opts.use_qk_l2norm_in_kernel, USE_GATE=use_gate,
                     USE_LB=use_gate and opts.lower_bound is not None, HAS_A=use_gate and A_log is not None,
                     HAS_BIAS=use_gate and dt_bias is not None, BETA_SIGMOID=opts.use_beta_sigmoid_in_kernel,
                     BETA_SCALE=2.0 if opts.allow_neg_eigval else 1.0)
        A_log = A_log if A_log is not None else g
        dt_bias = dt_bias if dt_bias is not None else g
        lower_bound = float(opts.lower_bound) if opts.lower_bound is not None else 0.0
        if impl == "split2":
            launch_split2(q, k, v, g, beta, A_log, dt_bias, aqk, w, u, qg, kg, gl, scratch, table, flags,
                          float(opts.scale), lower_bound, KP, BK, BKA, BV, config, launch)
            return aqk, w, u, qg, kg, gl
        if impl == "split":
            launch_split(q, k, v, g, beta, A_log, dt_bias, aqk, w, u, qg, kg, gl, scratch, table, flags,
                         float(opts.scale), lower_bound, KP, BK, BKA, BV, config, launch)
            return aqk, w, u, qg, kg, gl
        kernel = _chunk_intra_rows_kernel if impl == "rows" else _chunk_intra_fused_kernel
        kernel[(table.num_chunks, HV)](
            q, k, v, g, beta, A_log, dt_bias,
            aqk, w, u, qg, kg, gl, scratch, table.chunk_seq, table.chunk_pos, table.cu, float(opts.scale),
            lower_bound, **flags,
            BK=BK, BV=BV, DOT_PREC=config.get("intra_precision", "tf32"),
            SOLVE_PREC=config.get("solve_precision", "tf32"), NUM_STAGES=config.get("intra_stages", 1),
            num_warps=config.get("intra_warps", 4), **launch)
    return aqk, w, u, qg, kg, gl
