"""Stage 1 of the chunkwise forward: everything that stays inside one chunk (design.md section 1).

One program instance per (chunk, value head) reads q, k, v, g, beta of its chunk once and writes what the
inter-chunk stage (:mod:`.chunk_state`) needs, so no other pass over the inputs is made:

* fused prologue: KDA gate (``use_gate_in_kernel``), q/k L2 norm, beta sigmoid (:mod:`.gate`);
* ``Gamma``: cumulative log decay inside the chunk (float32, padding rows of a ragged chunk decay by 0);
* ``A_kk`` and ``A_qk`` (the decayed k.k and q.k products).  Off-diagonal 16x16 blocks are tensor-core
  products factored around the last row ``e`` of the column block (``exp(Gamma_r - Gamma_e)`` times
  ``exp(Gamma_e - Gamma_s)``, both exponents <= 0, so nothing overflows); the diagonal blocks are computed
  elementwise with the exact pairwise exponent ``exp(Gamma_r - Gamma_s)`` (idea: FLA's sub-chunk split,
  fla/ops/kda/chunk_intra.py; written anew here);
* the unit-lower-triangular inverse ``X = (I + A_kk)^-1`` (float32), diagonal blocks by forward
  substitution and off-diagonal blocks by block forward substitution;
* ``w = X diag(beta) (k * exp(Gamma))``, ``u = X diag(beta) v`` (the UT transform);
* ``qg = scale * q * exp(Gamma)``, ``kd = k * exp(Gamma_last - Gamma)``, ``gl = exp(Gamma_last)``.

Outputs ``w, u, qg, kd, Aqk`` are written in the input dtype to row-padded buffers (``TP >= TT + C`` rows,
so the next stage may read whole chunks), ``gl`` in float32, one row per chunk.
"""

import itertools

import tilelang.language as T

from .gate import Prologue, beta_value, inv_norm, log_decay
from .target import ops_for

ACC = "float32"


def chunk_intra(K: int, V: int, C: int = 64, *, dtype: str = "bfloat16",
                g_dtype: str = "float32", beta_dtype: str = "float32", scale: float = 1.0,
                prologue: Prologue = Prologue(), block: int = 16, threads: int = 128, target: str = "cuda"):
    """Kernel factory for stage 1.  Task config: head dims, chunk size ``C``, dtypes, scale and prologue
    switches (token, chunk and head counts are runtime sizes, so one build serves every shape).  Kernel config: ``block`` (diagonal sub-block size), ``threads``."""
    ops = ops_for(target)
    p = prologue
    H = T.dynamic("H")     # key heads
    HV = T.dynamic("HV")   # value heads (a multiple of H)
    NB = C // block
    TT = T.dynamic("TT")   # tokens of the input
    TP = T.dynamic("TP")   # rows of the padded intermediate buffers
    NC = T.dynamic("NC")   # chunks, all sequences together
    tile = ops.tile_dtype(dtype)   # on-chip copies and tensor-core operands
    zero = T.cast(0, tile)

    @T.prim_func
    def kernel(q: T.Tensor((TT, H, K), dtype), k: T.Tensor((TT, H, K), dtype), v: T.Tensor((TT, HV, V), dtype),
               g: T.Tensor((TT, HV, K), g_dtype), beta: T.Tensor((TT, HV), beta_dtype),
               A_log: T.Tensor((HV,), ACC), dt_bias: T.Tensor((HV, K), ACC),
               chunk_bos: T.Tensor((NC,), "int32"), chunk_len: T.Tensor((NC,), "int32"),
               w: T.Tensor((TP, HV, K), dtype), u: T.Tensor((TP, HV, V), dtype),
               qg: T.Tensor((TP, HV, K), dtype), kd: T.Tensor((TP, HV, K), dtype),
               Aqk: T.Tensor((TP, HV, C), dtype), gl: T.Tensor((NC, HV, K), ACC)):
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
            X = ops.alloc_shared((C, C), ACC)        # (I + A_kk)^-1
            P = ops.alloc_shared((C, C), ACC)        # block forward-substitution scratch
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
                Gs[r, c] = T.if_then_else(
                    r < L, log_decay(p, T.cast(g[bos + r, hv, c], ACC), A_log[hv], dt_bias[hv, c]), 0.0)
            # ---- cumulative decay (one column per thread, serial over the chunk's rows)
            for c in ops.Parallel(K):
                for r in T.serial(C - 1):
                    Gs[r + 1, c] = Gs[r + 1, c] + Gs[r, c]
            # ---- L2-norm factors and beta
            for r in ops.Parallel(C):
                rq[r] = 0.0
                rk[r] = 0.0
                bs[r] = T.if_then_else(r < L, beta_value(p, T.cast(beta[bos + r, hv], ACC)), 0.0)
            if p.l2norm:
                for r in ops.Parallel(C):
                    for c in T.serial(K):
                        rq[r] = rq[r] + T.cast(qs[r, c], ACC) * T.cast(qs[r, c], ACC)
                        rk[r] = rk[r] + T.cast(ks[r, c], ACC) * T.cast(ks[r, c], ACC)
                for r in ops.Parallel(C):
                    rq[r] = inv_norm(rq[r])
                    rk[r] = inv_norm(rk[r])
            else:
                for r in ops.Parallel(C):
                    rq[r] = 1.0
                    rk[r] = 1.0

            # ---- off-diagonal blocks of A_kk, A_qk: rows in later blocks x columns of block j
            T.clear(Akk_f)
            T.clear(Aqk_f)
            for j in T.serial(NB - 1):
                e = (j + 1) * block - 1               # reference row: last row of column block j
                for r, c in ops.Parallel(C, K):
                    ta[r, c] = T.if_then_else(r > e, ops.to_tile(T.cast(ks[r, c], ACC) * T.exp(Gs[r, c] - Gs[e, c]), dtype), zero)
                    tb[r, c] = T.if_then_else(r > e, ops.to_tile(T.cast(qs[r, c], ACC) * T.exp(Gs[r, c] - Gs[e, c]), dtype), zero)
                    tc[r, c] = T.if_then_else(T.And(r <= e, r > e - block),
                                              ops.to_tile(T.cast(ks[r, c], ACC) * T.exp(Gs[e, c] - Gs[r, c]), dtype), zero)
                T.gemm(ta, tc, Akk_f, transpose_B=True)
                T.gemm(tb, tc, Aqk_f, transpose_B=True)
            T.copy(Akk_f, Akk)
            T.copy(Aqk_f, Aqs)
            # ---- diagonal blocks, exact pairwise decay exp(Gamma_r - Gamma_s) <= 1
            for r, s0 in ops.Parallel(C, block):
                s = (r // block) * block + s0
                if s <= r:
                    for c in T.serial(K):
                        kd_rs = T.cast(ks[s, c], ACC) * T.exp(Gs[r, c] - Gs[s, c])
                        Akk[r, s] = Akk[r, s] + T.cast(ks[r, c], ACC) * kd_rs
                        Aqs[r, s] = Aqs[r, s] + T.cast(qs[r, c], ACC) * kd_rs
            # ---- norms, beta, scale and causal masks
            for r, s in ops.Parallel(C, C):
                Akk[r, s] = T.if_then_else(s < r, Akk[r, s] * bs[r] * rk[r] * rk[s], 0.0)
                Aqs[r, s] = T.if_then_else(s <= r, Aqs[r, s] * (scale * rq[r] * rk[s]), 0.0)
            for r, s in ops.Parallel(C, C):
                if r < L:
                    Aqk[bos + r, hv, s] = T.cast(Aqs[r, s], dtype)

            # ---- X = (I + A_kk)^-1: diagonal blocks by forward substitution (all blocks at once)
            for r, s in ops.Parallel(C, C):
                X[r, s] = T.if_then_else(r == s, 1.0, 0.0)
                P[r, s] = 0.0
            for i in T.serial(block - 1):
                for b, j in ops.Parallel(NB, block):
                    r = b * block + i + 1
                    col = b * block + j
                    if j < i + 1:
                        for t in T.serial(i + 1 - j):
                            X[r, col] = X[r, col] - Akk[r, col + t] * X[col + t, col]
            # ---- off-diagonal blocks, block row by block row: X_i,<i = -X_ii (A_i,<i X_<i,<i)
            for bi in T.serial(NB - 1):
                for r0, col in ops.Parallel(block, C):
                    r = (bi + 1) * block + r0
                    if col < (bi + 1) * block:
                        for t in T.serial((bi + 1) * block - col):
                            P[r, col] = P[r, col] + Akk[r, col + t] * X[col + t, col]
                for r0, col in ops.Parallel(block, C):
                    r = (bi + 1) * block + r0
                    if col < (bi + 1) * block:
                        for t in T.serial(r0 + 1):
                            X[r, col] = X[r, col] - X[r, (bi + 1) * block + t] * P[(bi + 1) * block + t, col]

            # ---- w = X diag(beta) (k exp(Gamma)), u = X diag(beta) v
            for r, c in ops.Parallel(C, K):
                ta[r, c] = ops.to_tile(T.cast(ks[r, c], ACC) * (rk[r] * bs[r]) * T.exp(Gs[r, c]), dtype)
            for r, c in ops.Parallel(C, V):
                tv[r, c] = T.if_then_else(r < L, ops.to_tile(T.cast(v[bos + r, hv, c], ACC) * bs[r], dtype), zero)
            for r, s in ops.Parallel(C, C):
                Xd[r, s] = ops.to_tile(X[r, s], dtype)
            T.clear(W_f)
            T.clear(U_f)
            T.gemm(Xd, ta, W_f)
            T.gemm(Xd, tv, U_f)
            for r, c in ops.Parallel(C, K):
                if r < L:
                    w[bos + r, hv, c] = T.cast(W_f[r, c], dtype)
            for r, c in ops.Parallel(C, V):
                if r < L:
                    u[bos + r, hv, c] = T.cast(U_f[r, c], dtype)
            # ---- what the state recurrence needs from this chunk
            for r, c in ops.Parallel(C, K):
                if r < L:
                    qg[bos + r, hv, c] = T.cast(T.cast(qs[r, c], ACC) * (scale * rq[r]) * T.exp(Gs[r, c]), dtype)
                    kd[bos + r, hv, c] = T.cast(T.cast(ks[r, c], ACC) * rk[r] * T.exp(Gs[C - 1, c] - Gs[r, c]), dtype)
            for c in ops.Parallel(K):
                gl[ic, hv, c] = T.exp(Gs[C - 1, c])

    return kernel


def get_configs() -> list[dict]:
    """Autotuner search space (kernel config only)."""
    return [dict(block=b, threads=t) for b, t in itertools.product((16,), (128, 256))]
