"""The blocked triangular inverse of the chunkwise forward (docs/algorithm.md), a ``@triton.jit`` helper called
inside the solve kernel (chunk_intra.py) on A_kk kept in scratch:

    T = (I + A)^-1 diag(beta),   A strictly lower triangular [C, C], C = 32 or 64

* the 16x16 diagonal blocks (all C/16 of them at once) by forward substitution in float32, rows in
  registers as a [C/16, 16, 16] tensor, or (config ``solve_diag``) by six block-diagonal [C, C] products;
* with Dinv their inverse and N = Dinv A_off (strictly block-lower, so N^4 = 0), (I + A) = Dblk (I + N) and
  (I + A)^-1 = (I - N)(I + N^2) Dinv: three or four [C, C] tensor-core products (``SOLVE_PREC``: "tf32"
  default, "ieee" for float32 FMA; measured error of both in docs/triton.md).

Non-finite entries of A (rows at or after a NaN gate) are read as 0, so they cannot leak into earlier rows
through the dense products.  Also :func:`t_times_v`, the ``U = T v`` product.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .gate import finite_or_zero


@triton.jit
def diag_inverse_products(b_l, eye, PREC: tl.constexpr):
    """``(I + L)^-1`` of a block-diagonal ``L [C, C]`` whose 16x16 blocks are strictly lower: L^16 = 0, so
    ``(I + L)^-1 = (I - L)(I + L^2)(I + L^4)(I + L^8)``, six tensor-core products (block-diagonal throughout)."""
    b_p = b_l
    b_inv = eye - b_l
    for _ in tl.static_range(3):
        b_p = tl.dot(b_p, b_p, input_precision=PREC)
        b_inv = tl.dot(b_inv, eye + b_p, input_precision=PREC)
    return b_inv


@triton.jit
def block_inverse(base, b_beta, C: tl.constexpr, SOLVE_PREC: tl.constexpr, DIAG: tl.constexpr):
    """``(I + A)^-1 diag(beta)`` for the strictly lower ``A [C, C]`` stored (float32, row-major) at ``base``;
    ``[C, 16]`` floats after it are scratch.  Diagonal 16x16 blocks (``DIAG``: "subst", forward substitution
    with all blocks at once and rows kept in registers; or a dot precision, :func:`diag_inverse_products`),
    then (I + N)^-1 = (I - N)(I + N^2) with N = Dinv A_off (N^4 = 0)."""
    NB: tl.constexpr = C // 16
    o_c = tl.arange(0, C)
    blk = o_c // 16
    same = blk[:, None] == blk[None, :]
    eye = tl.where(o_c[:, None] == o_c[None, :], 1.0, 0.0)
    if DIAG == "subst":
        o_16 = tl.arange(0, 16)
        # stacked diagonal blocks: row r holds A[r, 16 blk(r) : 16 blk(r) + 16]
        b_ad = tl.reshape(finite_or_zero(tl.load(base + o_c[:, None] * C + (blk * 16)[:, None] + o_16[None, :])),
                          (NB, 16, 16))
        r3 = tl.arange(0, 16)[None, :, None]
        c3 = tl.arange(0, 16)[None, None, :]
        eye3 = tl.where(r3 == c3, 1.0, 0.0)
        b_inv = eye3 + tl.zeros([NB, 16, 16], dtype=tl.float32)
        for j in range(1, 16):  # forward substitution, row j of all diagonal blocks at once
            row = tl.sum(tl.where(r3 == j, b_ad, 0.0), 1)                # [NB, 16]: A[j, :] of each block
            new = -tl.sum(row[:, :, None] * b_inv, 1)                    # -sum_s A[j, s] Inv[s, :]
            b_inv = tl.where(r3 == j, new[:, None, :] + eye3, b_inv)
        base_d = base + C * C
        tl.store(base_d + tl.arange(0, NB)[:, None, None] * 256 + r3 * 16 + c3, b_inv)
        tl.debug_barrier()
        b_dinv = tl.load(base_d + o_c[:, None] * 16 + (o_c % 16)[None, :], mask=same, other=0.0)
        b_aoff = finite_or_zero(tl.load(base + o_c[:, None] * C + o_c[None, :], mask=~same, other=0.0))
    else:
        b_a = finite_or_zero(tl.load(base + o_c[:, None] * C + o_c[None, :]))
        b_dinv = diag_inverse_products(tl.where(same, b_a, 0.0), eye, DIAG)
        b_aoff = tl.where(same, 0.0, b_a)
    return off_diagonal_inverse(b_dinv, b_aoff, eye, b_beta, NB, SOLVE_PREC)


@triton.jit
def t_times_v(b_m, v, u, o_t, m_t, i_h, HV: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
              DOT_PREC: tl.constexpr, NUM_STAGES: tl.constexpr):
    """``U = T v`` for the chunk's rows ``o_t`` (valid where ``m_t``) of value head ``i_h``: ``T [C, C]`` float32
    (:func:`block_inverse`), ``v, u [TT, HV, V]``, one ``[C, BV]`` block at a time."""
    for i_v in tl.range(0, tl.cdiv(V, BV), num_stages=NUM_STAGES):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        p_v = o_t[:, None] * (HV * V) + i_h * V + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m, other=0.0).to(tl.float32)
        tl.store(u + p_v, tl.dot(b_m, b_v, input_precision=DOT_PREC).to(u.dtype.element_ty), mask=m)


@triton.jit
def off_diagonal_inverse(b_dinv, b_aoff, eye, b_beta, NB: tl.constexpr, SOLVE_PREC: tl.constexpr):
    """``(I + A)^-1 diag(beta)`` from the inverse ``Dinv`` of its block diagonal and its off-diagonal part
    ``A_off``: with ``N = Dinv A_off`` (nilpotent), ``(I + A)^-1 = (I - N)(I + N^2) Dinv`` for up to four blocks
    (``I - N`` for two)."""
    b_n = tl.dot(b_dinv, b_aoff, input_precision=SOLVE_PREC)
    if NB > 2:
        b_x = tl.dot(eye - b_n, eye + tl.dot(b_n, b_n, input_precision=SOLVE_PREC), input_precision=SOLVE_PREC)
    else:
        b_x = eye - b_n
    return tl.dot(b_x, b_dinv, input_precision=SOLVE_PREC) * b_beta[None, :]
