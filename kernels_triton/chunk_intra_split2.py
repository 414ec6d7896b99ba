"""Stage 1, fourth organisation (``intra_impl="split2"``): "split" (chunk_intra_split.py) with the token-sized
outputs moved to the A kernel, so the solve kernel reads neither Gamma nor k.

Measured on the H100 (bench/kernel_breakdown.py, B2·T8192·H16), the three kernels of "split" took prep
314 µs, A 389 µs and solve 410 µs; prep ran at 62 % of DRAM bandwidth and solve read Gamma (float32, C·K
per chunk and head) and k again only to form ``k r_k exp(Gamma)``.  Here:

1. prep (``_split_prep_kernel``, ``WRITE_QK=False``): Gamma to the scratch, gl; no qg/kg.  With
   ``intra_norms="a"`` (default) prep reads only g: the A kernel takes the q/k L2-norm factors itself (its own
   rows, and the k rows it uses as columns, which it reads anyway; the columns are scaled after the
   products).  Measured (run M, B2·T8192·H16): prep 101 µs + A 418 µs against 175 + 383 with the factors
   from prep (``intra_norms="prep"``); the forward was 1-4 % faster at every standard shape.
2. A (``_split_a_kernel``, ``WRITE_QK`` 1 or 2): as in "split", and in its span pass (which already loads
   the block's Gamma rows; ``intra_a_outputs="span"``, the default) or its product pass (``"main"``) the
   block's rows of ``qg = q r_q exp(Gamma)``, ``kg = k r_k exp(Gamma_C - Gamma)`` and
   ``ke = k r_k exp(Gamma)``, the last into W's buffer (input dtype).
3. solve (``_split2_solve_kernel``): the blocked inverse (solve_tril.py) of A_kk, then ``W = T ke`` in place
   over ke (each program reads a ``[C, BK]`` block of its own chunk before it writes it) and ``U = T v``.

ke is rounded to the input dtype before the W product (flash-linear-attention rounds the same operand);
"split" forms it in float32 inside the solve kernel.  A first version of this organisation folded the
prologue into the A kernel instead (Gamma by ``tl.cumsum`` in each of a chunk's C/16 programs, no Gamma
scratch): its A kernel took 1.40 ms against 0.70 ms for split's prep and A together (cross-warp scans and
reductions in every K step, 188 registers), so it was dropped; rounding T to bf16 for bf16 W/U products made
the solve kernel slower (657 µs vs 351 µs with float32 T) and gave wrong results on the GPU (the CPU
interpreter, which widens bf16 products, passed), so it was dropped too.  Defaults: the A kernel at K-block
32 without software pipelining (``intra_a_BK=32, intra_a_stages=1``: 349 µs against 440 with the
compiler's pipelining and 532 at K-block 16, B2·T8192·H16).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .chunk_intra_split import _split_a_kernel, _split_prep_kernel
from .gate import beta_act, chunk_bounds
from .solve_tril import block_inverse

# where the A kernel writes qg, kg, ke (config intra_a_outputs): its span pass, or its product pass
OUTPUT_PASSES = {"span": 1, "main": 2}


@triton.jit
def _split2_solve_kernel(
    w, v, beta, u, scratch, chunk_seq, chunk_pos, cu,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, KP: tl.constexpr,
    BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PREC: tl.constexpr, SOLVE_PREC: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """K3: T = (I + A_kk)^-1 diag(beta) from the scratch; W = T ke (in place over ke, in ``w``), U = T v."""
    SCRATCH: tl.constexpr = C * C + C * 16 + C * KP + 2 * C
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos, last = chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C)
    base = scratch + (i_c.to(tl.int64) * HV + i_h) * SCRATCH
    o_c = tl.arange(0, C)
    o_t = t0 + o_c
    m_t = o_t < eos

    b_beta = tl.where(m_t, beta_act(tl.load(beta + o_t * HV + i_h, mask=m_t, other=0.0), BETA_SIGMOID, BETA_SCALE),
                      0.0)
    b_m = block_inverse(base, b_beta, C, SOLVE_PREC)
    for i_k in tl.range(0, tl.cdiv(K, BK), num_stages=NUM_STAGES):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        p_w = w + o_t[:, None] * (HV * K) + i_h * K + o_k[None, :]
        b_ke = tl.load(p_w, mask=m, other=0.0).to(tl.float32)
        tl.store(p_w, tl.dot(b_m, b_ke, input_precision=DOT_PREC).to(w.dtype.element_ty), mask=m)
    for i_v in tl.range(0, tl.cdiv(V, BV), num_stages=NUM_STAGES):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        p_v = o_t[:, None] * (HV * V) + i_h * V + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m, other=0.0).to(tl.float32)
        tl.store(u + p_v, tl.dot(b_m, b_v, input_precision=DOT_PREC).to(u.dtype.element_ty), mask=m)


def launch_split2(q, k, v, g, beta, A_log, dt_bias, aqk, w, u, qg, kg, gl, scratch, table, flags: dict,
                  scale: float, lower_bound: float, KP: int, BK: int, BKA: int, BV: int, config: dict, launch: dict):
    """Launch K1 (split's prep without qg/kg), K2 (split's A kernel writing qg, kg and ke into ``w``) and K3 on
    one stream; arguments as :func:`chunk_intra_split.launch_split`."""
    NC, HV, C = table.num_chunks, flags["HV"], flags["C"]
    H, K, V = flags["H"], flags["K"], flags["V"]
    warps = config.get("intra_warps", 4)
    dot_prec = config.get("intra_precision", "tf32")
    chunks = (table.chunk_seq, table.chunk_pos, table.cu)
    where = config.get("intra_a_outputs", "span")
    if where not in OUTPUT_PASSES:
        raise ValueError(f"intra_a_outputs must be 'span' or 'main', got {where!r}")
    write_qk = OUTPUT_PASSES[where]
    norms = config.get("intra_norms", "a")
    if norms not in ("prep", "a"):
        raise ValueError(f"intra_norms must be 'prep' or 'a', got {norms!r}")
    _split_prep_kernel[(NC, HV)](
        q, k, g, A_log, dt_bias, qg, kg, gl, scratch, *chunks, lower_bound,
        H=H, HV=HV, K=K, C=C, L2NORM=flags["L2NORM"], USE_GATE=flags["USE_GATE"], USE_LB=flags["USE_LB"],
        HAS_A=flags["HAS_A"], HAS_BIAS=flags["HAS_BIAS"], KP=KP, BK=BK, WRITE_QK=False, NORMS=norms == "prep",
        num_warps=warps)
    _split_a_kernel[(C // 16 * NC, HV)](
        q, k, beta, aqk, scratch, *chunks, scale,
        H=H, HV=HV, K=K, C=C, BETA_SIGMOID=flags["BETA_SIGMOID"], BETA_SCALE=flags["BETA_SCALE"], KP=KP, BK=BKA,
        DOT_PREC=dot_prec, NUM_STAGES=config.get("intra_a_stages"), qg=qg, kg=kg, ke=w, WRITE_QK=write_qk,
        L2NORM=flags["L2NORM"], NORMS_IN_A=norms == "a",
        num_warps=config.get("intra_a_warps", 4))
    _split2_solve_kernel[(NC, HV)](
        w, v, beta, u, scratch, *chunks, HV=HV, K=K, V=V, C=C, KP=KP,
        BETA_SIGMOID=flags["BETA_SIGMOID"], BETA_SCALE=flags["BETA_SCALE"], BK=BK, BV=BV, DOT_PREC=dot_prec,
        SOLVE_PREC=config.get("solve_precision", "tf32"), NUM_STAGES=config.get("intra_stages", 1),
        num_warps=warps, **launch)
