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
2. A (``_split_a_kernel``, ``OUT_PASS`` 1 or 2): as in "split", and in its span pass (which already loads
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

from .chunk_intra_split import launch_prep_and_a, scratch_views
from .gate import chunk_beta, chunk_bounds
from .solve_tril import block_inverse, solve_diag, t_times_v

# where the A kernel writes qg, kg, ke (config intra_a_outputs): its span pass, or its product pass
OUTPUT_PASSES = {"span": 1, "main": 2}
# where it takes the q/k L2-norm factors (config intra_norms): itself ("a", default) or from prep
NORM_PLACES = ("a", "prep")


@triton.jit
def _split2_solve_kernel(
    w, v, beta, u, scratch, chunk_seq, chunk_pos, cu,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, KP: tl.constexpr,
    BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PREC: tl.constexpr, SOLVE_PREC: tl.constexpr, SOLVE_DIAG: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """K3: T = (I + A_kk)^-1 diag(beta) from the scratch; W = T ke (in place over ke, in ``w``), U = T v."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos, last = chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C)
    base, s_g, s_r = scratch_views(scratch, i_c, i_h, HV, C, KP)
    o_c = tl.arange(0, C)
    o_t = t0 + o_c
    m_t = o_t < eos

    b_beta = chunk_beta(beta, o_t, m_t, i_h, HV, BETA_SIGMOID, BETA_SCALE)
    b_m = block_inverse(base, b_beta, C, SOLVE_PREC, SOLVE_DIAG)
    for i_k in tl.range(0, tl.cdiv(K, BK), num_stages=NUM_STAGES):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        p_w = w + o_t[:, None] * (HV * K) + i_h * K + o_k[None, :]
        b_ke = tl.load(p_w, mask=m, other=0.0).to(tl.float32)
        tl.store(p_w, tl.dot(b_m, b_ke, input_precision=DOT_PREC).to(w.dtype.element_ty), mask=m)
    t_times_v(b_m, v, u, o_t, m_t, i_h, HV, V, BV, DOT_PREC, NUM_STAGES)


def launch_split2(q, k, v, g, beta, A_log, dt_bias, aqk, w, u, qg, kg, gl, scratch, table, flags: dict,
                  scale: float, lower_bound: float, KP: int, BK: int, BKA: int, BV: int, config: dict, launch: dict):
    """Launch K1 (split's prep without qg/kg), K2 (split's A kernel writing qg, kg and ke into ``w``) and K3 on
    one stream; arguments as :func:`chunk_intra_split.launch_split`."""
    where = config.get("intra_a_outputs", "span")
    if where not in OUTPUT_PASSES:
        raise ValueError(f"intra_a_outputs must be 'span' or 'main', got {where!r}")
    norms = config.get("intra_norms", "a")
    if norms not in NORM_PLACES:
        raise ValueError(f"intra_norms must be one of {NORM_PLACES}, got {norms!r}")
    launch_prep_and_a(q, k, g, beta, A_log, dt_bias, aqk, qg, kg, gl, scratch, table, flags, scale, lower_bound,
                      KP, BK, BKA, config, ke=w, out_pass=OUTPUT_PASSES[where], norms_in_a=norms == "a")
    _split2_solve_kernel[(table.num_chunks, flags["HV"])](
        w, v, beta, u, scratch, table.chunk_seq, table.chunk_pos, table.cu, HV=flags["HV"], K=flags["K"],
        V=flags["V"], C=flags["C"], KP=KP, BETA_SIGMOID=flags["BETA_SIGMOID"], BETA_SCALE=flags["BETA_SCALE"], BK=BK,
        BV=BV, DOT_PREC=config.get("intra_precision", "tf32"), SOLVE_PREC=config.get("solve_precision", "tf32"),
        SOLVE_DIAG=solve_diag(config),
        NUM_STAGES=config.get("intra_stages", 1), num_warps=config.get("intra_warps", 4), **launch)
