"""The fused chunkwise forward: every stage of docs/algorithm.md in one kernel, ``kda_fused``.

One program per (column block, value head, sequence segment) walks the segment's chunks in order and keeps its
slice of the state ``S [K, block_V]`` in float32 registers.  Per chunk it loads q, k, v, g and beta once and
computes on chip (:mod:`.fused_intra`): the prologues and Gamma, A_kk and A_qk (first-row factoring, causal bit
for bit), the blocked inverse ``X``, then::

    W     = X (beta k exp(Gamma)),   U = X (beta v)
    V_new = U - W S
    O     = scale (q exp(Gamma)) S + aqk V_new
    S     = exp(gc) S + (k exp(gc - Gamma))^T V_new

so HBM sees the inputs, the output and one state per segment (plus the state entering every chunk with
``store_states``).  Nothing else is written.

Segment scan (docs/algorithm.md).  The state has ``VA`` columns, a runtime size: ``VA = V`` runs the plain
forward; ``VA = V + K`` appends the homogeneous run ``M``: column blocks at or past V carry ``v = 0`` and start
from the identity, so their "output" is the scaled effective query ``qt_t = scale M_t^T q_t`` (written to ``qt``)
and their final state is the segment's ``M``.  The first segment of a sequence starts from the sequence's initial
state and needs no ``M`` (its M blocks return at once).  ``hs`` receives every segment's final augmented state
``[C | M]`` (K-first, float32).  The scan and the fix-up are in :mod:`.segment_scan`.
"""

import tilelang.language as T

from .fused_intra import BLOCK, a_products, block_inverse, factor_shift, load_chunk, range_check
from .gate import Prologue, finite_or_zero
from .state_layout import state_entry
from .target import ops_for, runtime_sizes

ACC = "float32"
SMEM_LIMIT = 227 * 1024   # dynamic shared memory per block on the H100 / H200


def shared_bytes(K: int, V: int, C: int, block_V: int, dtype: str) -> int:
    """Shared memory of one ``kda_fused`` program on the GPU (the buffers of the kernel below, with their reuse)."""
    e = 4 if dtype == "float32" else 2
    ea = 4 if dtype in ("float32", "float16") else 2           # A-product operands
    ke = C * K * e if dtype == "float16" else 0
    return (C * K * 4 + 4 * C * C * 4 + 2 * C * K * e + C * K * ea + ke + K * block_V * e + 2 * C * block_V * e
            + 2 * C * C * e + 2 * BLOCK * K * ea + 6 * C * 4)


def kda_fused(K: int, V: int, C: int = 64, *, dtype: str = "bfloat16", g_dtype: str = "float32",
              beta_dtype: str = "float32", scale: float = 1.0, prologue: Prologue = Prologue(), has_h0: bool = False,
              state_v_first: bool = False, store_states: bool = False, block_V: int = 64, threads: int = 256,
              target: str = "cuda"):
    """Kernel factory of the fused forward.  Task config: head dims, chunk size ``C``, dtypes, scale, prologue,
    ``has_h0`` (initial state ``h0`` in the user's layout, ``state_v_first``), ``store_states`` (the state entering
    each chunk to ``hc [chunks, HV, K, V]``).  Kernel config: ``block_V`` (state columns per program; divides K and
    V), ``threads``.  Token, chunk, segment and head counts and ``VA`` are runtime sizes."""
    if C % BLOCK or K % block_V or V % block_V:
        raise ValueError(f"kda_fused: C must be a multiple of {BLOCK} and block_V ({block_V}) divide K={K}, V={V}")
    # the [C, K] x [K, 16] A products give each warp >= 16 rows and 8 columns: at most 4 C threads (8 warps at C = 64)
    threads = min(threads, 4 * C)
    ops = ops_for(target)
    unroll = T.serial if ops.cpu else T.unroll
    p = prologue
    d, check = factor_shift(p)
    BV = block_V
    H, HV, TT, TQ, NC, NH, NSEG, N0, VA = runtime_sizes("H HV TT TQ NC NH NSEG N0 VA")
    state = (HV, V, K) if state_v_first else (HV, K, V)
    tile = ops.tile_dtype(dtype)
    io = ops.tensor_dtype(dtype)   # global tensors of dtype (float32 on the CPU)
    # fp16 cannot hold exp(60) |k|: the A products of fp16 inputs take float32 operands (TF32 on the GPU)
    a_dtype = "float32" if dtype == "float16" else dtype
    a_tile = ops.tile_dtype(a_dtype)

    @T.prim_func
    def kda_fused(q: T.Tensor((TT, H, K), io), k: T.Tensor((TT, H, K), io), v: T.Tensor((TT, HV, V), io),
                  g: T.Tensor((TT, HV, K), g_dtype), beta: T.Tensor((TT, HV), beta_dtype),
                  A_log: T.Tensor((HV,), ACC), dt_bias: T.Tensor((HV, K), ACC),
                  chunk_bos: T.Tensor((NC,), "int32"), chunk_len: T.Tensor((NC,), "int32"),
                  seg_chunk0: T.Tensor((NSEG,), "int32"), seg_nchunks: T.Tensor((NSEG,), "int32"),
                  seg_seq: T.Tensor((NSEG,), "int32"), seg_first: T.Tensor((NSEG,), "int32"),
                  h0: T.Tensor((N0, *state), ACC), o: T.Tensor((TT, HV, V), io), qt: T.Tensor((TQ, HV, K), io),
                  hs: T.Tensor((NSEG, HV, K, VA), ACC), hc: T.Tensor((NH, HV, K, V), io)):
        with T.Kernel(T.ceildiv(VA, BV), HV, NSEG, threads=threads) as (iv, hv, n):
            qs = ops.alloc_shared((C, K), tile)
            ks = ops.alloc_shared((C, K), tile)
            Gs = ops.alloc_shared((C, K), ACC)
            bs = ops.alloc_shared((C,), ACC)
            vs = ops.alloc_shared((C, BV), tile)
            sq = ops.alloc_fragment((C, K), ACC)
            nrm = ops.alloc_fragment((C,), ACC)
            rq = ops.alloc_shared((C,), ACC)
            rk = ops.alloc_shared((C,), ACC)
            span = ops.alloc_fragment((C,), ACC)
            spans = ops.alloc_shared((C,), ACC)
            exact = ops.alloc_shared((C,), "int32")
            trk = ops.alloc_shared((BLOCK, K), a_tile)
            trq = ops.alloc_shared((BLOCK, K), a_tile)
            tcol = ops.alloc_shared((C, K), a_tile)
            acck = ops.alloc_fragment((C, BLOCK), ACC)
            accq = ops.alloc_fragment((C, BLOCK), ACC)
            Akk = ops.alloc_shared((C, C), ACC)
            Aqs = ops.alloc_shared((C, C), ACC)
            aqk = ops.alloc_shared((C, C), tile)
            Dinv = ops.alloc_shared((C, C), ACC)
            Zs = ops.alloc_shared((C, C), ACC)
            Nf = ops.alloc_fragment((C, C), ACC)
            Pf = ops.alloc_fragment((C, C), ACC)
            Xf = ops.alloc_fragment((C, C), ACC)
            Xs = ops.alloc_shared((C, C), tile)
            # shared memory is reused where lifetimes allow (docs/tilelang.md, "Fused forward"): k exp(Gamma) and
            # then W live in tcol's buffer (unless the A operands are float32), qg in qs, kg in ks, N in Aqs
            ke = tcol if a_tile == tile else ops.alloc_shared((C, K), tile)
            W_f = ops.alloc_fragment((C, K), ACC)
            U_f = ops.alloc_fragment((C, BV), ACC)
            S = ops.alloc_fragment((K, BV), ACC)
            S_s = ops.alloc_shared((K, BV), tile)
            vn_f = ops.alloc_fragment((C, BV), ACC)
            vn_s = ops.alloc_shared((C, BV), tile)
            o_f = ops.alloc_fragment((C, BV), ACC)
            xcol = T.alloc_local((BLOCK,), ACC)
            run = T.alloc_local((2,), ACC)

            v0 = iv * BV
            c0 = seg_chunk0[n]
            seq = seg_seq[n]
            first = seg_first[n]
            h = hv // (HV // H)
            # M blocks of a sequence's first segment have nothing to do (its incoming state is known)
            if T.Or(v0 < V, first == 0):
                # ---- incoming state: h0 (first segment), the identity (M blocks), else zeros
                for c, j in ops.Parallel(K, BV):
                    if v0 < V:
                        if has_h0:
                            S[c, j] = T.if_then_else(first != 0, state_entry(h0, seq, hv, c, v0 + j, state_v_first),
                                                     0.0)
                        else:
                            S[c, j] = 0.0
                    else:
                        S[c, j] = T.if_then_else(c == v0 + j - V, 1.0, 0.0)
                for i in T.serial(seg_nchunks[n]):
                    bos = chunk_bos[c0 + i]
                    L = chunk_len[c0 + i]
                    load_chunk(ops, p, unroll, dtype, q, k, g, beta, A_log, dt_bias, bos, L, h, hv, qs, ks, Gs, bs,
                               run, sq, nrm, rq, rk)
                    if check:
                        range_check(ops, Gs, L, d, span, spans, sq, exact)
                    a_products(ops, qs, ks, Gs, bs, exact, d, check, scale, a_dtype, trk, trq, tcol, acck, accq,
                               run, Akk, Aqs)
                    for r, s in ops.Parallel(C, C):
                        aqk[r, s] = ops.to_tile(Aqs[r, s], dtype)
                    block_inverse(ops, unroll, Akk, xcol, Dinv, Aqs, Zs, Nf, Pf, Xf)
                    # ---- W = X (beta k exp(Gamma)), U = X (beta v); v = 0 in the M blocks
                    for r, s in ops.Parallel(C, C):
                        Xs[r, s] = ops.to_tile(Xf[r, s], dtype)
                    for r, c in ops.Parallel(C, K):
                        ke[r, c] = ops.to_tile(finite_or_zero(T.cast(ks[r, c], ACC) * bs[r] * T.exp(Gs[r, c])), dtype)
                    for r, j in ops.Parallel(C, BV):
                        vs[r, j] = T.if_then_else(T.And(r < L, v0 < V),
                                                  ops.to_tile(T.cast(v[bos + r, hv, v0 + j], ACC) * bs[r], dtype),
                                                  T.cast(0, tile))
                    T.clear(W_f)
                    T.gemm(Xs, ke, W_f)
                    T.clear(U_f)
                    T.gemm(Xs, vs, U_f)
                    for r, c in ops.Parallel(C, K):
                        ke[r, c] = ops.to_tile(W_f[r, c], dtype)   # W
                    # ---- state and output
                    if store_states:
                        for c, j in ops.Parallel(K, BV):
                            hc[c0 + i, hv, c, v0 + j] = ops.to_tile(S[c, j], dtype)
                    for c, j in ops.Parallel(K, BV):
                        S_s[c, j] = ops.to_tile(S[c, j], dtype)
                    for r, c in ops.Parallel(C, K):   # qg, kg in place
                        qs[r, c] = ops.to_tile(T.cast(qs[r, c], ACC) * T.exp(Gs[r, c]), dtype)
                        ks[r, c] = T.if_then_else(
                            r < L, ops.to_tile(T.cast(ks[r, c], ACC) * T.exp(Gs[C - 1, c] - Gs[r, c]), dtype),
                            T.cast(0, tile))
                    T.clear(vn_f)
                    T.gemm(ke, S_s, vn_f)
                    # rows past the chunk's end are zero on both sides of the updates
                    for r, j in ops.Parallel(C, BV):
                        vn_s[r, j] = T.if_then_else(r < L, ops.to_tile(U_f[r, j] - vn_f[r, j], dtype),
                                                    T.cast(0, tile))
                    T.clear(o_f)
                    T.gemm(qs, S_s, o_f)
                    for r, j in ops.Parallel(C, BV):
                        o_f[r, j] = o_f[r, j] * scale
                    T.gemm(aqk, vn_s, o_f)
                    for r, j in ops.Parallel(C, BV):
                        if r < L:
                            if v0 < V:
                                o[bos + r, hv, v0 + j] = ops.to_tile(o_f[r, j], dtype)
                            else:
                                qt[bos + r, hv, v0 + j - V] = ops.to_tile(o_f[r, j], dtype)
                    for c, j in ops.Parallel(K, BV):
                        S[c, j] = S[c, j] * T.exp(Gs[C - 1, c])
                    T.gemm(ks, vn_s, S, transpose_A=True)
                for c, j in ops.Parallel(K, BV):
                    hs[n, hv, c, v0 + j] = S[c, j]

    return kda_fused
