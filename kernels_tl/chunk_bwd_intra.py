"""Stage 3 of the TileLang backward: dq, dk and the gate gradient of every chunk (docs/algorithm.md, "The chunkwise backward",
sections 2, 4, 5 and the gate of 6).

One program per (K block, chunk, value head); the K channels never mix here except in beta's row term, written
per K block and summed (fixed order) by the prologue stage.

1. intra-chunk terms from P (gradient of A_qk / scale) and Abar (gradient of A_kk), both from the solve stage:
   Gq = sum_s P E k_s, Gk = sum_s Abar E k_s (row side), Hc = sum_r (P q_r + beta_r Abar k_r) E (column side).
   Row block i against the columns s < f = 16 i is one tensor-core product per side, factored around the
   block's first row f: exp(Gamma_r - Gamma_f) exp(Gamma_f - Gamma_s), both <= 1 and depending on tokens up to
   row r only (causal bit for bit).  The row-side factor exp(Gamma_r - Gamma_f) is applied once at the end
   (P and Abar are masked to block i's rows, so block i's rows only receive product i).  The 16x16 diagonal
   tiles are element-wise (every exponent <= 0), which keeps gates down to -1000 exact;
2. inter-chunk terms, one value block at a time: d(qg) = scale dO h^T, d(kg) = V_new dhn^T, d(ke) = -dv h^T and
   rowsum(h * dhn) for the gradient of gc;
3. dGamma, its reverse cumulative sum inside the chunk (dg of the log decay) and, with the gate in the kernel,
   the gate's backward with per-chunk partial sums of dA_log and ddt_bias (reduced on the host in a fixed
   order).
dq and dk are written float32 per value head (gradients of the normalised q, k); the prologue stage sums the
groups and applies the L2 norm's backward.
"""

import tilelang.language as T

from .chunk_bwd_tiles import BLOCK, chunk_beta, chunk_gamma, row_norms
from .gate import SOFTPLUS_THRESHOLD, Prologue, sigmoid, softplus
from .target import ops_for, runtime_sizes

ACC = "float32"


def gate_grads(p: Prologue, dgl, graw, a_log, bias):
    """``(dx, dA_log term)`` of the gate for the log-decay gradient ``dgl`` at raw gate ``graw`` (float32)."""
    x = graw + bias if p.has_dt_bias else graw
    if p.lower_bound is not None:
        y = T.exp(a_log) * x if p.has_A_log else x
        s = sigmoid(y)
        dy = dgl * p.lower_bound * s * (1.0 - s)
        return (dy * T.exp(a_log) if p.has_A_log else dy), dy * y
    a = T.exp(a_log)
    slope = T.if_then_else(x > SOFTPLUS_THRESHOLD, 1.0, sigmoid(x))   # softplus is linear above the threshold
    return -dgl * a * slope, -dgl * a * softplus(x)


def kda_bwd_intra(K: int, V: int, C: int = 64, *, dtype: str = "bfloat16", g_dtype: str = "float32",
                  beta_dtype: str = "float32", scale: float = 1.0, prologue: Prologue = Prologue(),
                  block_K: int = 64, block_V: int = 32, threads: int = 128, target: str = "cuda"):
    """Kernel factory for the intra stage.  Kernel config: ``block_K`` (channels per program), ``block_V``
    (value columns per step of the inter-chunk products), ``threads``."""
    ops = ops_for(target)
    unroll = T.serial if ops.cpu else T.unroll
    p = prologue
    BK, BV = block_K, block_V
    NB = C // BLOCK
    NKB = K // BK
    H, HV, TT, TP, NC, NG = runtime_sizes("H HV TT TP NC NG")
    tile = ops.tile_dtype(dtype)
    io = ops.tensor_dtype(dtype)   # global tensors of dtype (float32 on the CPU)
    zero = T.cast(0, tile)

    @T.prim_func
    def kda_bwd_intra(q: T.Tensor((TT, H, K), io), k: T.Tensor((TT, H, K), io),
                      g: T.Tensor((TT, HV, K), g_dtype), beta: T.Tensor((TT, HV), beta_dtype),
                      A_log: T.Tensor((HV,), ACC), dt_bias: T.Tensor((HV, K), ACC),
                      chunk_bos: T.Tensor((NC,), "int32"), chunk_len: T.Tensor((NC,), "int32"),
                      dO: T.Tensor((TT, HV, V), io), v_new: T.Tensor((TP, HV, V), io),
                      dv: T.Tensor((TT, HV, V), ACC), h: T.Tensor((NC, HV, K, V), io),
                      dhn: T.Tensor((NC, HV, K, V), io), dAkk: T.Tensor((TP, HV, C), ACC),
                      dAqk: T.Tensor((TP, HV, C), ACC), dq: T.Tensor((TT, HV, K), ACC),
                      dk: T.Tensor((TT, HV, K), ACC), dg: T.Tensor((TT, HV, K), g_dtype),
                      dbeta_part: T.Tensor((NKB, TT, HV), ACC), dA_part: T.Tensor((NG, HV, K), ACC),
                      ddt_part: T.Tensor((NG, HV, K), ACC)):
        with T.Kernel(NKB, NC, HV, threads=threads) as (kb, ic, hv):
            qs = ops.alloc_shared((C, BK), tile)
            ks = ops.alloc_shared((C, BK), tile)
            Gs = ops.alloc_shared((C, BK), ACC)
            rq = ops.alloc_shared((C,), ACC)
            rk = ops.alloc_shared((C,), ACC)
            bs = ops.alloc_shared((C,), ACC)
            Ps = ops.alloc_shared((C, C), ACC)
            As = ops.alloc_shared((C, C), ACC)
            Pm = ops.alloc_shared((C, C), tile)
            Am = ops.alloc_shared((C, C), tile)
            # The off-diagonal products' q/k operands as pairs hi + lo, each rounded to the tile dtype (about 16
            # mantissa bits for bf16).  The intra-chunk terms depend on differences of Gamma only, so their dGamma
            # contributions sum to zero over a chunk; but the row side and the column side round different
            # operands, and a single bf16 rounding leaves a residue that the reverse cumsum and the sum over all
            # tokens (ddt_bias) add up coherently.  The pairs keep the products on 16-bit tensor cores.
            kb_s = ops.alloc_shared((C, BK), tile)
            qe_s = ops.alloc_shared((C, BK), tile)
            be_s = ops.alloc_shared((C, BK), tile)
            kb_l = ops.alloc_shared((C, BK), tile)
            qe_l = ops.alloc_shared((C, BK), tile)
            be_l = ops.alloc_shared((C, BK), tile)
            Gq = ops.alloc_fragment((C, BK), ACC)
            Gk = ops.alloc_fragment((C, BK), ACC)
            Hc = ops.alloc_fragment((C, BK), ACC)
            Hi = ops.alloc_fragment((C, BK), ACC)
            Ws = ops.alloc_shared((C, BK + 1), ACC)   # row/column sums (padded: conflict-free rows)
            run = T.alloc_local((4,), ACC)
            h_s = ops.alloc_shared((BK, BV), tile)
            dh_s = ops.alloc_shared((BK, BV), tile)
            do_s = ops.alloc_shared((C, BV), tile)
            vn_s = ops.alloc_shared((C, BV), tile)
            dv_s = ops.alloc_shared((C, BV), tile)
            Xq = ops.alloc_fragment((C, BK), ACC)
            Xk = ops.alloc_fragment((C, BK), ACC)
            Xe = ops.alloc_fragment((C, BK), ACC)
            hd_f = ops.alloc_fragment((BK, BV), ACC)
            hd_r = ops.alloc_fragment((BK,), ACC)
            hdh = ops.alloc_fragment((BK,), ACC)   # a fragment: replicated threads each add to their own copy
            hdh_s = ops.alloc_shared((BK,), ACC)
            dG = ops.alloc_shared((C, BK), ACC)

            bos = chunk_bos[ic]
            L = chunk_len[ic]
            hk = hv // (HV // H)
            k0 = kb * BK

            for r, c in ops.Parallel(C, BK):
                qs[r, c] = T.if_then_else(r < L, T.cast(q[bos + r, hk, k0 + c], tile), zero)
                ks[r, c] = T.if_then_else(r < L, T.cast(k[bos + r, hk, k0 + c], tile), zero)
            for r, s in ops.Parallel(C, C):
                Ps[r, s] = T.if_then_else(r < L, dAqk[bos + r, hv, s], 0.0)
                As[r, s] = T.if_then_else(r < L, dAkk[bos + r, hv, s], 0.0)
            chunk_gamma(ops, unroll, p, g, A_log, dt_bias, bos, L, hv, k0, Gs, run)
            row_norms(ops, p.l2norm, q, bos, L, hk, rq, run)
            row_norms(ops, p.l2norm, k, bos, L, hk, rk, run)
            chunk_beta(ops, p, beta, bos, L, hv, bs)

            # ---- 1. intra-chunk terms, off-diagonal: row block i x columns s < f = 16 i
            T.clear(Gq)
            T.clear(Gk)
            T.clear(Hc)
            for i0 in T.serial(NB - 1):
                f = (i0 + 1) * BLOCK
                for r, c in ops.Parallel(C, BK):
                    inb = T.And(r >= f, r < f + BLOCK)
                    e_rf = T.exp(T.if_then_else(inb, Gs[r, c] - Gs[f, c], 0.0))
                    xq = T.if_then_else(inb, T.cast(qs[r, c], ACC) * rq[r] * e_rf, 0.0)
                    xb = T.if_then_else(inb, T.cast(ks[r, c], ACC) * (rk[r] * bs[r]) * e_rf, 0.0)
                    xk = T.if_then_else(r < f, T.cast(ks[r, c], ACC) * rk[r] * T.exp(Gs[f, c] - Gs[r, c]), 0.0)
                    qe_s[r, c] = ops.to_tile(xq, dtype)
                    be_s[r, c] = ops.to_tile(xb, dtype)
                    kb_s[r, c] = ops.to_tile(xk, dtype)
                    qe_l[r, c] = ops.to_tile(xq - T.cast(qe_s[r, c], ACC), dtype)
                    be_l[r, c] = ops.to_tile(xb - T.cast(be_s[r, c], ACC), dtype)
                    kb_l[r, c] = ops.to_tile(xk - T.cast(kb_s[r, c], ACC), dtype)
                for r, s in ops.Parallel(C, C):
                    inb = T.And(T.And(r >= f, r < f + BLOCK), s < f)
                    Pm[r, s] = T.if_then_else(inb, ops.to_tile(Ps[r, s], dtype), zero)
                    Am[r, s] = T.if_then_else(inb, ops.to_tile(As[r, s], dtype), zero)
                T.gemm(Pm, kb_s, Gq)
                T.gemm(Pm, kb_l, Gq)
                T.gemm(Am, kb_s, Gk)
                T.gemm(Am, kb_l, Gk)
                T.clear(Hi)
                T.gemm(Pm, qe_s, Hi, transpose_A=True)
                T.gemm(Pm, qe_l, Hi, transpose_A=True)
                T.gemm(Am, be_s, Hi, transpose_A=True)
                T.gemm(Am, be_l, Hi, transpose_A=True)
                for s, c in ops.Parallel(C, BK):
                    Hc[s, c] = Hc[s, c] + T.if_then_else(s < f, Hi[s, c] * T.exp(Gs[f, c] - Gs[s, c]), 0.0)
            # row-side factor of each row's own block; then the diagonal tiles element-wise
            for r, c in ops.Parallel(C, BK):
                e_rf = T.exp(Gs[r, c] - Gs[(r // BLOCK) * BLOCK, c])
                run[0] = 0.0
                run[1] = 0.0
                run[2] = 0.0
                for j in T.serial(BLOCK):
                    t = (r // BLOCK) * BLOCK + j
                    if t <= r:   # row side: column t of row r
                        e = T.exp(Gs[r, c] - Gs[t, c]) * T.cast(ks[t, c], ACC) * rk[t]
                        run[0] = run[0] + Ps[r, t] * e
                        run[1] = run[1] + As[r, t] * e
                    if t >= r:   # column side: row t of column r
                        e2 = T.exp(Gs[t, c] - Gs[r, c])
                        run[2] = run[2] + (Ps[t, r] * T.cast(qs[t, c], ACC) * rq[t]
                                           + As[t, r] * T.cast(ks[t, c], ACC) * (rk[t] * bs[t])) * e2
                Gq[r, c] = Gq[r, c] * e_rf + run[0]
                Gk[r, c] = Gk[r, c] * e_rf + run[1]
                Hc[r, c] = Hc[r, c] + run[2]
            # dq = Gq, dk = beta Gk + Hc, dGamma = q Gq + beta k Gk - k Hc, dbeta += k . Gk
            for r, c in ops.Parallel(C, BK):
                qn = T.cast(qs[r, c], ACC) * rq[r]
                kn = T.cast(ks[r, c], ACC) * rk[r]
                gk = Gk[r, c]
                hc = Hc[r, c]
                Ws[r, c] = kn * gk
                Gk[r, c] = bs[r] * gk + hc
                dG[r, c] = qn * Gq[r, c] + bs[r] * kn * gk - kn * hc   # to shared: frees Hc's registers
            for r in ops.Parallel(C):   # sums over a gemm accumulator's layout do not lower for TF32: shared
                run[0] = 0.0
                for c in T.serial(BK):
                    run[0] = run[0] + Ws[r, c]
                if r < L:
                    dbeta_part[kb, bos + r, hv] = run[0]

            # ---- 2. inter-chunk terms, one value block at a time
            T.clear(Xq)
            T.clear(Xk)
            T.clear(Xe)
            T.clear(hdh)
            for iv in T.serial(V // BV):
                v0 = iv * BV
                for c, j in ops.Parallel(BK, BV):
                    h_s[c, j] = h[ic, hv, k0 + c, v0 + j]
                    dh_s[c, j] = dhn[ic, hv, k0 + c, v0 + j]
                for r, j in ops.Parallel(C, BV):
                    do_s[r, j] = T.if_then_else(r < L, T.cast(dO[bos + r, hv, v0 + j], tile), zero)
                    vn_s[r, j] = T.if_then_else(r < L, v_new[bos + r, hv, v0 + j], zero)
                    dv_s[r, j] = T.if_then_else(r < L, ops.to_tile(dv[bos + r, hv, v0 + j], dtype), zero)
                T.gemm(do_s, h_s, Xq, transpose_B=True)
                T.gemm(vn_s, dh_s, Xk, transpose_B=True)
                T.gemm(dv_s, h_s, Xe, transpose_B=True)
                for c, j in ops.Parallel(BK, BV):
                    hd_f[c, j] = T.cast(h_s[c, j], ACC) * T.cast(dh_s[c, j], ACC)
                ops.rowsum(hd_f, hd_r)
                for c in ops.Parallel(BK):
                    hdh[c] = hdh[c] + hd_r[c]
            # d(qg) = scale Xq, d(kg) = Xk, d(ke) = -Xe, with qg = q e^Gamma, kg = k e^(gc - Gamma), ke = k e^Gamma
            for r, c in ops.Parallel(C, BK):
                eg = T.if_then_else(r < L, T.exp(Gs[r, c]), 0.0)
                ec = T.if_then_else(r < L, T.exp(Gs[C - 1, c] - Gs[r, c]), 0.0)
                qn = T.cast(qs[r, c], ACC) * rq[r]
                kn = T.cast(ks[r, c], ACC) * rk[r]
                xq = scale * Xq[r, c]
                Gq[r, c] = Gq[r, c] + xq * eg
                Gk[r, c] = Gk[r, c] + Xk[r, c] * ec - Xe[r, c] * eg
                dG[r, c] = dG[r, c] + xq * qn * eg - Xk[r, c] * kn * ec - Xe[r, c] * kn * eg
                Ws[r, c] = Xk[r, c] * kn * ec
            for c in ops.Parallel(BK):   # to shared with plain stores (replicated threads write equal values)
                hdh_s[c] = hdh[c]
            for r, c in ops.Parallel(C, BK):
                if r < L:
                    dq[bos + r, hv, k0 + c] = Gq[r, c]
                    dk[bos + r, hv, k0 + c] = Gk[r, c]

            # ---- 3. gc is Gamma at the last valid row; reverse cumulative sum; the gate's backward
            for c in ops.Parallel(BK):
                run[0] = T.exp(Gs[C - 1, c]) * hdh_s[c]   # d(gc): exp(gc) rowsum(h * dhn) + sum_r d(kg) kg
                for r in T.serial(C):
                    run[0] = run[0] + Ws[r, c]
                run[1] = 0.0
                run[2] = 0.0
                for rr in T.serial(C):   # not unrolled: the gate math would hold registers per row
                    r = C - 1 - rr
                    if r < L:
                        run[0] = run[0] + dG[r, c]
                        if p.gate:
                            graw = T.cast(g[bos + r, hv, k0 + c], ACC)
                            dx, da = gate_grads(p, run[0], graw, A_log[hv], dt_bias[hv, k0 + c])
                            dg[bos + r, hv, k0 + c] = T.cast(dx, g_dtype)
                            run[1] = run[1] + dx
                            run[2] = run[2] + da
                        else:
                            dg[bos + r, hv, k0 + c] = T.cast(run[0], g_dtype)
                if p.gate:
                    ddt_part[ic, hv, k0 + c] = run[1]
                    dA_part[ic, hv, k0 + c] = run[2]

    return kda_bwd_intra
