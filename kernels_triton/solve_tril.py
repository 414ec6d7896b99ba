"""The blocked triangular inverse of the chunkwise forward (docs/algorithm.md), a ``@triton.jit`` helper called
inside the solve kernel (chunk_intra.py) on A_kk kept in scratch:

    T = (I + A)^-1 diag(beta),   A strictly lower triangular [C, C], C = 32 or 64

* the inverses Dinv of the C/16 diagonal 16x16 blocks, all at once as a [C/16, 16, 16] tensor
  (:func:`diag_block_inverses`, config ``solve_diag``): six batched 16x16 tensor-core products
  (I - L)(I + L^2)(I + L^4)(I + L^8) at a product precision (default "tf32"), or ("subst") forward substitution
  in float32 with the rows in registers.  They go to a [C, 16] float32 scratch beside A, where the backward's
  solve kernel reads them instead of forming them again;
* with N = Dinv A_off (strictly block-lower, so N^4 = 0), (I + A) = Dblk (I + N) and
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
def diag_block_inverses(base, dinv, C: tl.constexpr, DIAG: tl.constexpr):
    """Store at ``dinv`` (``[C, 16]`` float32, row r holding ``Dinv[r, 16 blk(r) : 16 blk(r) + 16]``) the inverses
    of ``I + L`` for the 16x16 diagonal blocks ``L`` of the strictly lower ``A [C, C]`` at ``base``.  ``DIAG``:
    "subst" for forward substitution in float32, else the precision of six products: L^16 = 0, so
    ``(I + L)^-1 = (I - L)(I + L^2)(I + L^4)(I + L^8)``."""
    NB: tl.constexpr = C // 16
    o_c = tl.arange(0, C)
    r3 = tl.arange(0, 16)[None, :, None]
    c3 = tl.arange(0, 16)[None, None, :]
    eye3 = tl.where(r3 == c3, 1.0, 0.0) + tl.zeros([NB, 16, 16], dtype=tl.float32)
    # stacked diagonal blocks: row r holds A[r, 16 blk(r) : 16 blk(r) + 16]
    b_l = tl.reshape(finite_or_zero(tl.load(base + o_c[:, None] * C + ((o_c // 16) * 16)[:, None]
                                            + tl.arange(0, 16)[None, :])), (NB, 16, 16))
    if DIAG == "subst":
        b_inv = eye3
        for j in range(1, 16):  # row j of every block's inverse: e_j - sum_{s<j} L[j, s] Inv[s, :]
            row = tl.sum(tl.where(r3 == j, b_l, 0.0), 1)                 # [NB, 16]: L[j, :] of each block
            new = -tl.sum(row[:, :, None] * b_inv, 1)                    # -sum_s L[j, s] Inv[s, :]
            b_inv = tl.where(r3 == j, new[:, None, :] + eye3, b_inv)
    else:
        b_p = b_l
        b_inv = eye3 - b_l
        for _ in tl.static_range(3):
            b_p = tl.dot(b_p, b_p, input_precision=DIAG)
            b_inv = tl.dot(b_inv, eye3 + b_p, input_precision=DIAG)
    tl.store(dinv + tl.arange(0, NB)[:, None, None] * 256 + r3 * 16 + c3, b_inv)


@triton.jit
def block_inverse(base, dinv, b_beta, C: tl.constexpr, SOLVE_PREC: tl.constexpr, DIAG: tl.constexpr):
    """``(I + A)^-1 diag(beta)`` for the strictly lower ``A [C, C]`` stored (float32, row-major) at ``base``, with
    the inverses of its diagonal blocks at ``dinv`` (:func:`diag_block_inverses`' layout).  ``DIAG``: how to form
    them first (:func:`diag_block_inverses`), or "stored" to use the ones already there.  Then
    (I + N)^-1 = (I - N)(I + N^2) with N = Dinv A_off (N^4 = 0)."""
    o_c = tl.arange(0, C)
    blk = o_c // 16
    same = blk[:, None] == blk[None, :]
    eye = tl.where(o_c[:, None] == o_c[None, :], 1.0, 0.0)
    if DIAG != "stored":
        diag_block_inverses(base, dinv, C, DIAG)
        tl.debug_barrier()   # the stores above are read back below by other threads of the program
    b_dinv = tl.load(dinv + o_c[:, None] * 16 + (o_c % 16)[None, :], mask=same, other=0.0)
    b_aoff = finite_or_zero(tl.load(base + o_c[:, None] * C + o_c[None, :], mask=~same, other=0.0))
    return off_diagonal_inverse(b_dinv, b_aoff, eye, b_beta, C // 16, SOLVE_PREC)


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
