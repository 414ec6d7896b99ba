"""Stage 1 of the Triton chunkwise forward: everything that stays inside one chunk (design.md section 1).

One program per (chunk, value head) applies the prologues (gate + chunk-local cumsum ``Gamma``, q/k L2 norm,
beta activation; gate.py) and computes:

    A_kk[r,s] = beta_r sum_c k_r[c] exp(Gamma_r[c] - Gamma_s[c]) k_s[c]   (s < r)
    A_qk[r,s] = scale  sum_c q_r[c] exp(Gamma_r[c] - Gamma_s[c]) k_s[c]   (s <= r)
    M = (I + A_kk)^-1,  W = M diag(beta) (k * exp(Gamma)),  U = M diag(beta) v
    qg = q * exp(Gamma),  kg = k * exp(Gamma_C - Gamma),  gl = Gamma_C     (for chunk_o and chunk_state)

Numerics (never exp(-Gamma) alone).  Five organisations compute these outputs (``intra_impl`` in the config):

* "split3" (chunk_intra_split3.py, the default and the only one in the autotune space): three kernels
  (Gamma; A by 16-row block, C/16 programs per chunk and head; inverse + W/U).  Each row block is one
  tensor-core product factored around its *first* row, shifted: ``exp(Gamma_r - Gamma_f + d) *
  exp(Gamma_f - d - Gamma_s)``, so an entry depends only on tokens up to its own row: causal bit for bit
  (design.md section 6).  Rows whose factors would leave exp(+-SPAN_MAX) (masked tokens, g = -1000) take
  their diagonal tile element-wise.
* "rows" (this file), "fused" (chunk_intra_fused.py), "split" (chunk_intra_split.py) and "split2"
  (chunk_intra_split2.py) factor each row block around its *middle* row ``16 i + 8`` (every factor <=
  exp(span), span <= 40 with the safe gate), or around row 16 i with an element-wise diagonal when the span
  exceeds SPAN_MAX.  The middle row is a later token for the block's first eight rows, so their outputs
  move by rounding (~1e-7 relative) when only a later token's inputs change: not causal bit for bit.  They
  stay selectable by an explicit config (they are checked against the reference like the default) but the
  autotune space leaves them out.  "rows" keeps Gamma and A in a per-program scratch, "fused" keeps [C, C]
  accumulators in registers, "split" is three kernels, "split2" is "split" with qg/kg/ke written by the A
  kernel; "split3" reuses split2's solve kernel.

The inverse is blocked (solve_tril.py): 16x16 diagonal blocks by forward substitution or by products
(``solve_diag``), then (I + A_kk)^-1 = (I - N)(I + N^2) Dinv with N = Dinv A_off.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_intra_fused import _chunk_intra_fused_kernel
from .chunk_intra_split import a_block_factored, launch_split, scratch_views, store_a_block
from .chunk_intra_split2 import launch_split2
from .chunk_intra_split3 import launch_split3
from .gate import SPAN_MAX, beta_act, chunk_beta, chunk_bounds, chunk_gamma, interpreting, l2norm_factors
from .solve_tril import block_inverse, solve_diag, t_times_v

BLOCK = 16         # diagonal sub-block size of the blocked inverse
IMPLS = ("rows", "fused", "split", "split2", "split3")  # organisations of the stage (config key intra_impl)
# The split/split2 measurements that chose their shapes (register counts, A-kernel times) are in docs/triton.md;
# they are no longer searched (not causal, module docstring).
# organisations the autotune space holds: those whose outputs never depend on a later token (see above)
CAUSAL_IMPLS = ("split3",)
# "split3" alternatives to the default, each changing one knob (H100, bench/RESULTS.md run P, µs per forward at
# B8·T4096·H32 safe gate: default 4034, solve_diag "subst" 4131, intra_a_warps 8 4294, intra_warps 8 5365;
# run R: intra_prep_BK 64 within 1 % of the default)
SPLIT3_VARIANTS = [{"solve_diag": "subst"}, {"solve_diag": "ieee"}, {"intra_a_warps": 8}, {"intra_a_BK": 16},
                   {"intra_a_norms": "first"}, {"intra_a_row_BK": 32}, {"intra_prep_BK": 64},
                   {"intra_warps": 8}]


def get_configs() -> list[dict]:
    """Search space of this stage, alternatives to DEFAULT_CONFIG (causal organisations only, see the module
    docstring): split3's knobs (A kernel: ``intra_a_BK`` product K-slice, ``intra_a_warps``, ``intra_a_norms``
    where the column norms are taken, ``intra_a_row_BK`` K-slice of its own rows; ``intra_prep_BK`` the Gamma
    kernel's K-slice; ``intra_warps`` the solve kernel's warps; ``solve_diag`` how the inverse's 16x16
    diagonal blocks are formed), a register cap of the solve kernel (``intra_maxnreg``, NVIDIA; None =
    compiler's choice), and the precision of the float32 products (A and W/U: ``intra_precision``; the
    inverse: ``solve_precision``)."""
    return ([{"intra_impl": "split3", **v} for v in SPLIT3_VARIANTS]
            + [{"intra_maxnreg": r} for r in (128, 168)]
            + [{"intra_precision": p, "solve_precision": sp} for p in ("tf32", "tf32x3", "ieee")
               for sp in ("tf32", "ieee")])


# "split3" with the inverse's diagonal blocks by TF32 products: fastest on the H100 at every standard shape and
# both gate modes of runs P and R (bench/RESULTS.md), e.g. B2·T8192·H16 log gate 1066 µs (run R) against 1138
# with forward substitution (run P) and 1134 for split2 (run N); causal bit for bit, unlike split2
DEFAULT_CONFIG = {"intra_impl": "split3", "intra_BK": 32, "intra_warps": 4, "intra_a_BK": 32, "intra_a_warps": 4,
                  "intra_a_stages": 1, "intra_a_norms": "split", "intra_a_row_BK": None, "intra_prep_BK": 32,
                  "intra_prep_warps": 4, "intra_stages": 1, "intra_precision": "tf32", "solve_precision": "tf32",
                  "solve_diag": "tf32"}


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
    SOLVE_DIAG: tl.constexpr,
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
    b_m = block_inverse(base, b_beta, C, SOLVE_PREC, SOLVE_DIAG)

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
        solve_diag(config)  # an unknown diagonal method fails here, before any launch
        # split: its A kernel has its own K-block width; Gamma's row stride in the scratch fits both
        BKA = min(config.get("intra_a_BK", 16), triton.next_power_of_2(K))
        # split3: its A kernel also reads whole rows (K rounded up to a power of two)
        row = max(BK, BKA, triton.next_power_of_2(K) if impl == "split3" else 1)
        KP = triton.cdiv(K, row) * row if impl in ("split", "split2", "split3") else triton.cdiv(K, BK) * BK
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
        if impl == "split3":
            launch_split3(q, k, v, g, beta, A_log, dt_bias, aqk, w, u, qg, kg, gl, scratch, table, flags,
                          float(opts.scale), lower_bound, KP, BK, BKA, BV, config, launch)
            return aqk, w, u, qg, kg, gl
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
            SOLVE_PREC=config.get("solve_precision", "tf32"), SOLVE_DIAG=solve_diag(config),
            NUM_STAGES=config.get("intra_stages", 1), num_warps=config.get("intra_warps", 4), **launch)
    return aqk, w, u, qg, kg, gl
