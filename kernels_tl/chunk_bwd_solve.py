"""Stage 2 of the TileLang backward: through W = T ke, U = T v and the triangular inverse
(docs/algorithm.md, "The chunkwise backward", sections 2-3).

One program per (chunk, value head).  It rebuilds A_kk from k, g, beta (never stored) with the causal
first-row factoring of the backward: row block i (rows 16 i ..) against the columns s < f = 16 i is one
tensor-core product of ``k_r exp(Gamma_r - Gamma_f)`` and ``k_s exp(Gamma_f - Gamma_s)`` (both factors <= 1);
the 16x16 diagonal tiles are element-wise with exp(Gamma_r - Gamma_s) <= 1 (gates down to -1000 stay exact).
X = (I + A_kk)^-1 by forward substitution (one column per thread, registers), T = X diag(beta).  Then one
value block at a time (products with float32 accumulation):

    dv    = T^T dV_new                        (the whole gradient of v)
    dT   += dV_new (v - ke h)^T               (= dV_new v^T + dW ke^T with dW = -dV_new h^T)
    dAqk += dO V_new^T

and at the end dbeta_j = sum_i dT[i,j] X[i,j] (beta as T's column factor), Abar = -X^T (dT diag(beta)) X^T
(strictly lower) and P = scale dAqk (causal), the gradients of A_kk and of A_qk / scale, written float32 for the
intra stage.  The X products run in float32 (TF32 on tensor cores), the others in the input dtype.
"""

import tilelang.language as T

from .chunk_bwd_tiles import BLOCK, chunk_beta, chunk_gamma, row_norms
from .gate import Prologue, finite_or_zero
from .target import ops_for, runtime_sizes

ACC = "float32"


def kda_bwd_solve(K: int, V: int, C: int = 64, *, dtype: str = "bfloat16", g_dtype: str = "float32",
                  beta_dtype: str = "float32", scale: float = 1.0, prologue: Prologue = Prologue(),
                  block_V: int = 32, threads: int = 128, target: str = "cuda"):
    """Kernel factory for the solve stage.  Kernel config: ``block_V`` (value columns per step), ``threads``."""
    ops = ops_for(target)
    unroll = T.serial if ops.cpu else T.unroll
    p = prologue
    BV = block_V
    NB = C // BLOCK
    H, HV, TT, TP, NC = runtime_sizes("H HV TT TP NC")
    tile = ops.tile_dtype(dtype)
    io = ops.tensor_dtype(dtype)   # global tensors of dtype (float32 on the CPU)
    zero = T.cast(0, tile)

    @T.prim_func
    def kda_bwd_solve(k: T.Tensor((TT, H, K), io), v: T.Tensor((TT, HV, V), io),
                      g: T.Tensor((TT, HV, K), g_dtype), beta: T.Tensor((TT, HV), beta_dtype),
                      A_log: T.Tensor((HV,), ACC), dt_bias: T.Tensor((HV, K), ACC),
                      chunk_bos: T.Tensor((NC,), "int32"), chunk_len: T.Tensor((NC,), "int32"),
                      dO: T.Tensor((TT, HV, V), io), v_new: T.Tensor((TP, HV, V), io),
                      dvn: T.Tensor((TP, HV, V), ACC), h: T.Tensor((NC, HV, K, V), io),
                      dv: T.Tensor((TT, HV, V), ACC), dAkk: T.Tensor((TP, HV, C), ACC),
                      dAqk: T.Tensor((TP, HV, C), ACC), dbeta: T.Tensor((TT, HV), ACC)):
        with T.Kernel(NC, HV, threads=threads) as (ic, hv):
            ks = ops.alloc_shared((C, K), tile)
            Gs = ops.alloc_shared((C, K), ACC)
            rk = ops.alloc_shared((C,), ACC)
            bs = ops.alloc_shared((C,), ACC)
            ta = ops.alloc_shared((C, K), tile)
            tc = ops.alloc_shared((C, K), tile)
            A_f = ops.alloc_fragment((C, C), ACC)
            Y_f = ops.alloc_fragment((C, C), ACC)
            Ab_f = ops.alloc_fragment((C, C), ACC)
            Akk = ops.alloc_shared((C, C), ACC)
            Xs = ops.alloc_shared((C, C), ACC)
            Ts = ops.alloc_shared((C, C), ACC)
            xcol = T.alloc_local((C,), ACC)
            run = T.alloc_local((2,), ACC)
            dvn_s = ops.alloc_shared((C, BV), ACC)
            do_s = ops.alloc_shared((C, BV), tile)
            vn_s = ops.alloc_shared((C, BV), tile)
            h_s = ops.alloc_shared((K, BV), tile)
            r_s = ops.alloc_shared((C, BV), ACC)
            kh_f = ops.alloc_fragment((C, BV), ACC)
            dv_f = ops.alloc_fragment((C, BV), ACC)
            dT_f = ops.alloc_fragment((C, C), ACC)
            dA_f = ops.alloc_fragment((C, C), ACC)

            bos = chunk_bos[ic]
            L = chunk_len[ic]
            hk = hv // (HV // H)

            for r, c in ops.Parallel(C, K):
                ks[r, c] = T.if_then_else(r < L, T.cast(k[bos + r, hk, c], tile), zero)
            chunk_gamma(ops, unroll, p, g, A_log, dt_bias, bos, L, hv, 0, Gs, run)
            row_norms(ops, p.l2norm, k, bos, L, hk, rk, run)
            chunk_beta(ops, p, beta, bos, L, hv, bs)

            # ---- A0 off the diagonal tiles: row block i against columns s < f = 16 i, factored around row f
            T.clear(A_f)
            for i0 in T.serial(NB - 1):
                f = (i0 + 1) * BLOCK
                for r, c in ops.Parallel(C, K):
                    kn = T.cast(ks[r, c], ACC) * rk[r]
                    ta[r, c] = T.if_then_else(T.And(r >= f, r < f + BLOCK),
                                              ops.to_tile(kn * T.exp(Gs[r, c] - Gs[f, c]), dtype), zero)
                    tc[r, c] = T.if_then_else(r < f, ops.to_tile(kn * T.exp(Gs[f, c] - Gs[r, c]), dtype), zero)
                T.gemm(ta, tc, A_f, transpose_B=True)
            T.copy(A_f, Akk)
            # ---- diagonal tiles element-wise (every exponent <= 0)
            for r, s0 in ops.Parallel(C, BLOCK):
                s = (r // BLOCK) * BLOCK + s0
                run[1] = 0.0
                if s < r:
                    for c in T.serial(K):
                        run[1] = run[1] + T.cast(ks[r, c], ACC) * T.cast(ks[s, c], ACC) * T.exp(Gs[r, c] - Gs[s, c])
                Akk[r, s] = run[1] * rk[r] * rk[s]
            # ---- A_kk = diag(beta) A0 (strictly lower, non-finite entries zeroed as in the forward)
            for r, s in ops.Parallel(C, C):
                Akk[r, s] = T.if_then_else(s < r, finite_or_zero(Akk[r, s] * bs[r]), 0.0)
            # ---- X = (I + A_kk)^-1 by forward substitution, one column per thread
            for j in ops.Parallel(C):
                for r in unroll(C):
                    xcol[r] = 0.0
                for r in unroll(C):
                    run[0] = T.if_then_else(r == j, 1.0, 0.0)
                    for s in unroll(C):
                        if s < r:
                            run[0] = run[0] - Akk[r, s] * xcol[s]
                    xcol[r] = run[0]
                    Xs[r, j] = run[0]
            for r, s in ops.Parallel(C, C):
                Ts[r, s] = Xs[r, s] * bs[s]
            # ke = k exp(Gamma) (normalised), the W operand of the forward
            for r, c in ops.Parallel(C, K):
                ta[r, c] = ops.to_tile(finite_or_zero(T.cast(ks[r, c], ACC) * rk[r] * T.exp(Gs[r, c])), dtype)

            # ---- value blocks: dv, dT, dAqk
            T.clear(dT_f)
            T.clear(dA_f)
            for iv in T.serial(V // BV):
                v0 = iv * BV
                for r, j in ops.Parallel(C, BV):
                    dvn_s[r, j] = T.if_then_else(r < L, dvn[bos + r, hv, v0 + j], 0.0)
                    do_s[r, j] = T.if_then_else(r < L, T.cast(dO[bos + r, hv, v0 + j], tile), zero)
                    vn_s[r, j] = T.if_then_else(r < L, v_new[bos + r, hv, v0 + j], zero)
                for c, j in ops.Parallel(K, BV):
                    h_s[c, j] = h[ic, hv, c, v0 + j]
                T.clear(kh_f)
                T.gemm(ta, h_s, kh_f)
                for r, j in ops.Parallel(C, BV):
                    r_s[r, j] = T.if_then_else(r < L, T.cast(v[bos + r, hv, v0 + j], ACC) - kh_f[r, j], 0.0)
                T.gemm(dvn_s, r_s, dT_f, transpose_B=True)
                T.gemm(do_s, vn_s, dA_f, transpose_B=True)
                T.clear(dv_f)
                T.gemm(Ts, dvn_s, dv_f, transpose_A=True)
                for r, j in ops.Parallel(C, BV):
                    if r < L:
                        dv[bos + r, hv, v0 + j] = dv_f[r, j]

            # ---- dbeta (column factor of T), Abar = -X^T (dT diag(beta)) X^T, P = scale dAqk
            for r, s in ops.Parallel(C, C):
                Akk[r, s] = dT_f[r, s] * Xs[r, s]
                Ts[r, s] = dT_f[r, s] * bs[s]
            for s in ops.Parallel(C):   # column sums, one column per thread (consecutive banks)
                run[0] = 0.0
                for r in T.serial(C):
                    run[0] = run[0] + Akk[r, s]
                if s < L:
                    dbeta[bos + s, hv] = run[0]
            T.clear(Y_f)
            T.gemm(Xs, Ts, Y_f, transpose_A=True)
            T.copy(Y_f, Akk)
            T.clear(Ab_f)
            T.gemm(Akk, Xs, Ab_f, transpose_B=True)
            for r, s in ops.Parallel(C, C):
                if r < L:
                    dAkk[bos + r, hv, s] = T.if_then_else(s < r, -Ab_f[r, s], 0.0)
            for r, s in ops.Parallel(C, C):   # a separate loop: the two fragments have different layouts
                if r < L:
                    dAqk[bos + r, hv, s] = T.if_then_else(s <= r, scale * dA_f[r, s], 0.0)

    return kda_bwd_solve
