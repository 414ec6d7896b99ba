"""Stage 1 of the chunkwise form as a kernel of its own (``kda_intra``), for the backward's recompute
(chunk_bwd_recompute.py): the forward itself runs it fused (chunk_fused.py), which writes none of these.

One program instance per (chunk, value head) reads q, k, v, g, beta of its chunk once and writes every
per-chunk intermediate the backward reads (docs/algorithm.md):

* fused prologue: KDA gate (``use_gate_in_kernel``), q/k L2 norm, beta sigmoid (:mod:`.gate`);
* ``Gamma``: cumulative log decay inside the chunk (float32, padding rows of a ragged chunk decay by 0);
* ``A_kk`` and ``A_qk`` (the decayed k.k and q.k products).  Off-diagonal 16x16 blocks are tensor-core
  products factored around the last row ``e`` of the column block (``exp(Gamma_r - Gamma_e)`` times
  ``exp(Gamma_e - Gamma_s)``, both exponents <= 0, so nothing overflows).  Diagonal 16x16 blocks are computed
  element-wise with the exact pairwise exponent ``exp(Gamma_r - Gamma_s)``: every entry depends only on tokens
  up to its own row, so the recompute is causal bit for bit (idea of the sub-chunk split: FLA's
  fla/ops/kda/chunk_intra.py; written anew here);
* the unit-lower-triangular inverse ``X = (I + A_kk)^-1`` (float32) by forward substitution, each thread
  holding one column in registers (no barriers, no shared-memory dependency chains);
* ``w = X diag(beta) (k * exp(Gamma))``, ``u = X diag(beta) v`` (the UT transform);
* ``qg = q * exp(Gamma)``, ``kg = k * exp(gc - Gamma)`` and ``gc`` (Gamma at the chunk's last row, log space):
  the conventions shared with the Triton twin.

Outputs ``w, u, qg, kg, aqk`` are written in the input dtype to row-padded buffers (``TP >= TT + C`` rows,
so the next stage may read whole chunks), ``gc`` in float32, one row per chunk.  A gate of -inf is floored at
G_FLOOR (its exp is 0 too); non-finite entries of A_kk (rows at or after a NaN gate) are zeroed before the
inverse and ``k exp(Gamma)`` before the W product, so 0 * NaN cannot leak into earlier rows.
"""

import tilelang.language as T

from .fused_intra import chunk_gamma, exact_diagonal_entry
from .gate import Prologue, beta_value, finite_or_zero, row_inv_norms
from .target import ops_for, runtime_sizes

ACC = "float32"


def kda_intra(K: int, V: int, C: int = 64, *, dtype: str = "bfloat16",
                g_dtype: str = "float32", beta_dtype: str = "float32", scale: float = 1.0,
                prologue: Prologue = Prologue(), block: int = 16, threads: int = 128,
                target: str = "cuda"):
    """Kernel factory for stage 1.  Task config: head dims, chunk size ``C``, dtypes, scale and prologue
    switches (token, chunk and head counts are runtime sizes, so one build serves every shape).  Kernel
    config: ``block`` (diagonal sub-block size), ``threads``."""
    ops = ops_for(target)
    unroll = T.serial if ops.cpu else T.unroll
    p = prologue
    H, HV = runtime_sizes("H HV")
    NB = C // block
    TT, TP, NC = runtime_sizes("TT TP NC")
    tile = ops.tile_dtype(dtype)   # on-chip copies and tensor-core operands
    io = ops.tensor_dtype(dtype)   # global tensors of dtype (float32 on the CPU)
    zero = T.cast(0, tile)

    @T.prim_func
    def kda_intra(q: T.Tensor((TT, H, K), io), k: T.Tensor((TT, H, K), io), v: T.Tensor((TT, HV, V), io),
                  g: T.Tensor((TT, HV, K), g_dtype), beta: T.Tensor((TT, HV), beta_dtype),
                  A_log: T.Tensor((HV,), ACC), dt_bias: T.Tensor((HV, K), ACC),
                  chunk_bos: T.Tensor((NC,), "int32"), chunk_len: T.Tensor((NC,), "int32"),
                  w: T.Tensor((TP, HV, K), io), u: T.Tensor((TP, HV, V), io),
                  qg: T.Tensor((TP, HV, K), io), kg: T.Tensor((TP, HV, K), io),
                  Aqk: T.Tensor((TP, HV, C), io), gc: T.Tensor((NC, HV, K), ACC)):
        with T.Kernel(NC, HV, threads=threads) as (ic, hv):
            qs = ops.alloc_shared((C, K), tile)
            ks = ops.alloc_shared((C, K), tile)
            Gs = ops.alloc_shared((C, K), ACC)       # Gamma, cumulative log decay
            rq = ops.alloc_shared((C,), ACC)         # L2-norm factors of q and k rows
            rk = ops.alloc_shared((C,), ACC)
            bs = ops.alloc_shared((C,), ACC)         # beta
            ta = ops.alloc_shared((C, K), tile)     # tensor-core operand tiles
            tb = ops.alloc_shared((C, K), tile)
            tc = ops.alloc_shared((C, K), tile)
            tv = ops.alloc_shared((C, V), tile)
            Akk_f = ops.alloc_fragment((C, C), ACC)
            Aqk_f = ops.alloc_fragment((C, C), ACC)
            Akk = ops.alloc_shared((C, C), ACC)
            Aqs = ops.alloc_shared((C, C), ACC)
            xcol = T.alloc_local((C,), ACC)          # one column of (I + A_kk)^-1 (per thread)
            run = T.alloc_local((2,), ACC)           # per-thread running sums
            part = T.alloc_local((4,), ACC)
            sq_f = ops.alloc_fragment((C, K), ACC)   # squares for the L2 norms
            nq_f = ops.alloc_fragment((C,), ACC)
            nk_f = ops.alloc_fragment((C,), ACC)
            Xd = ops.alloc_shared((C, C), tile)
            W_f = ops.alloc_fragment((C, K), ACC)
            U_f = ops.alloc_fragment((C, V), ACC)

            bos = chunk_bos[ic]
            L = chunk_len[ic]
            h = hv // (HV // H)

            # ---- load + gate prologue; rows >= L are zero (g = 0: padding does not decay)
            for r, c in ops.Parallel(C, K):
                qs[r, c] = T.if_then_else(r < L, T.cast(q[bos + r, h, c], tile), zero)
                ks[r, c] = T.if_then_else(r < L, T.cast(k[bos + r, h, c], tile), zero)
            # ---- Gamma: the gate, floored, summed down the chunk
            chunk_gamma(ops, p, unroll, g, A_log, dt_bias, bos, L, hv, Gs, run)
            # ---- L2-norm factors (row reductions: a serial loop per row would hit one shared bank) and beta
            if p.l2norm:
                row_inv_norms(ops, qs, sq_f, nq_f, rq)
                row_inv_norms(ops, ks, sq_f, nk_f, rk)
            else:
                for r in ops.Parallel(C):
                    rq[r] = 1.0
                    rk[r] = 1.0
            for r in ops.Parallel(C):
                bs[r] = T.if_then_else(r < L, beta_value(p, T.cast(beta[bos + r, hv], ACC)), 0.0)

            # ---- off-diagonal blocks of A_kk, A_qk: rows in later blocks x columns of block j
            T.clear(Akk_f)
            T.clear(Aqk_f)
            for j in T.serial(NB - 1):
                e = (j + 1) * block - 1               # reference row: last row of column block j
                for r, c in ops.Parallel(C, K):
                    if r > e:
                        d_re = T.exp(Gs[r, c] - Gs[e, c])
                        ta[r, c] = ops.to_tile(T.cast(ks[r, c], ACC) * d_re, dtype)
                        tb[r, c] = ops.to_tile(T.cast(qs[r, c], ACC) * d_re, dtype)
                    else:
                        ta[r, c] = zero
                        tb[r, c] = zero
                    if T.And(r <= e, r > e - block):
                        tc[r, c] = ops.to_tile(T.cast(ks[r, c], ACC) * T.exp(Gs[e, c] - Gs[r, c]), dtype)
                    else:
                        tc[r, c] = zero
                T.gemm(ta, tc, Akk_f, transpose_B=True)
                T.gemm(tb, tc, Aqk_f, transpose_B=True)
            T.copy(Akk_f, Akk)
            T.copy(Aqk_f, Aqs)
            # ---- diagonal blocks done exactly, pairwise decay exp(Gamma_r - Gamma_s) <= 1
            for r, s0 in ops.Parallel(C, block):
                s = (r // block) * block + s0
                if s <= r:
                    exact_diagonal_entry(ks, qs, Gs, run, Akk, Aqs, r, s)
            # ---- norms, beta, scale and causal masks
            for r, s in ops.Parallel(C, C):
                Akk[r, s] = T.if_then_else(s < r, finite_or_zero(Akk[r, s] * bs[r] * rk[r] * rk[s]), 0.0)
                Aqs[r, s] = T.if_then_else(s <= r, Aqs[r, s] * (scale * rq[r] * rk[s]), 0.0)
            for r, s in ops.Parallel(C, C):
                if r < L:
                    Aqk[bos + r, hv, s] = ops.to_tile(Aqs[r, s], dtype)

            # ---- X = (I + A_kk)^-1 by forward substitution: one column of X per thread, held in registers
            #      (X[r, j] = delta_rj - sum_{s<r} A_kk[r, s] X[s, j]); no barrier, no shared-memory chain
            #      four partial sums per row shorten the dependency chain of the unrolled products
            for j in ops.Parallel(C):
                for r in unroll(C):
                    xcol[r] = 0.0
                for r in unroll(C):
                    for a in T.serial(4):
                        part[a] = 0.0
                    for s in unroll(C):
                        if s < r:
                            part[s % 4] = part[s % 4] + Akk[r, s] * xcol[s]
                    xcol[r] = T.if_then_else(r == j, 1.0, 0.0) - ((part[0] + part[1]) + (part[2] + part[3]))
                    Xd[r, j] = ops.to_tile(xcol[r], dtype)

            # ---- w = X diag(beta) (k exp(Gamma)), u = X diag(beta) v
            for r, c in ops.Parallel(C, K):
                ta[r, c] = ops.to_tile(finite_or_zero(T.cast(ks[r, c], ACC) * (rk[r] * bs[r]) * T.exp(Gs[r, c])), dtype)
            for r, c in ops.Parallel(C, V):
                tv[r, c] = T.if_then_else(r < L, ops.to_tile(T.cast(v[bos + r, hv, c], ACC) * bs[r], dtype), zero)
            T.clear(W_f)
            T.clear(U_f)
            T.gemm(Xd, ta, W_f)
            T.gemm(Xd, tv, U_f)
            for r, c in ops.Parallel(C, K):
                if r < L:
                    w[bos + r, hv, c] = ops.to_tile(W_f[r, c], dtype)
            for r, c in ops.Parallel(C, V):
                if r < L:
                    u[bos + r, hv, c] = ops.to_tile(U_f[r, c], dtype)
            # ---- what the state recurrence needs from this chunk
            for r, c in ops.Parallel(C, K):
                if r < L:
                    qg[bos + r, hv, c] = ops.to_tile(T.cast(qs[r, c], ACC) * rq[r] * T.exp(Gs[r, c]), dtype)
                    kg[bos + r, hv, c] = ops.to_tile(T.cast(ks[r, c], ACC) * rk[r] * T.exp(Gs[C - 1, c] - Gs[r, c]),
                                                     dtype)
            for c in ops.Parallel(K):
                gc[ic, hv, c] = Gs[C - 1, c]

    return kda_intra
