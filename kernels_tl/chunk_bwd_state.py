"""Stage 1 of the TileLang backward: the reverse state recurrence (docs/algorithm.md, "The chunkwise backward", section 1).

One program per (value-column block, value head, sequence) walks the sequence's chunks from the last to the
first, holding its ``[K, block_V]`` slice of the float32 state gradient in registers (the V columns never mix):

    dhn_c  = dh                                  (gradient of the state leaving chunk c; stored, input dtype)
    dV_new = aqk^T dO + kg dh                    (stored float32: the solve and intra stages read it)
    dh     = exp(gc) * dh + scale qg^T dO - w^T dV_new

It starts from the final-state cotangent (or zero) and ends with dh0 (float32, the user's state layout).  The
mirror of the forward's state kernel: the same tiles, tensor-core products with float32 accumulation.
"""

import tilelang.language as T

from .state_layout import load_state_tile, store_state_entry
from .target import ops_for, runtime_sizes

ACC = "float32"


def kda_bwd_state(K: int, V: int, C: int = 64, *, dtype: str = "bfloat16", scale: float = 1.0,
                  has_dht: bool = False, store_dh0: bool = False, state_v_first: bool = False,
                  block_V: int = 32, threads: int = 128, target: str = "cuda"):
    """Kernel factory for the reverse recurrence.  Kernel config: ``block_V`` (state columns per program),
    ``threads``."""
    ops = ops_for(target)
    BV = block_V
    HV, TT, TP, NC, NS, N0, N1 = runtime_sizes("HV TT TP NC NS N0 N1")
    state = (HV, V, K) if state_v_first else (HV, K, V)
    tile = ops.tile_dtype(dtype)
    io = ops.tensor_dtype(dtype)   # global tensors of dtype (float32 on the CPU)
    zero = T.cast(0, tile)

    @T.prim_func
    def kda_bwd_state(qg: T.Tensor((TP, HV, K), io), kg: T.Tensor((TP, HV, K), io),
                      w: T.Tensor((TP, HV, K), io), Aqk: T.Tensor((TP, HV, C), io),
                      gc: T.Tensor((NC, HV, K), ACC), dO: T.Tensor((TT, HV, V), io),
                      chunk_bos: T.Tensor((NC,), "int32"), chunk_len: T.Tensor((NC,), "int32"),
                      seq_chunk0: T.Tensor((NS,), "int32"), seq_nchunks: T.Tensor((NS,), "int32"),
                      dht: T.Tensor((N1, *state), ACC), dhn: T.Tensor((NC, HV, K, V), io),
                      dvn: T.Tensor((TP, HV, V), ACC), dh0: T.Tensor((N0, *state), ACC)):
        with T.Kernel(T.ceildiv(V, BV), HV, NS, threads=threads) as (iv, hv, n):
            q_s = ops.alloc_shared((C, K), tile)
            k_s = ops.alloc_shared((C, K), tile)
            w_s = ops.alloc_shared((C, K), tile)
            a_s = ops.alloc_shared((C, C), tile)
            do_s = ops.alloc_shared((C, BV), tile)
            gc_s = ops.alloc_shared((K,), ACC)
            dh = ops.alloc_fragment((K, BV), ACC)
            dh_s = ops.alloc_shared((K, BV), tile)
            dv_f = ops.alloc_fragment((C, BV), ACC)
            dv_s = ops.alloc_shared((C, BV), tile)
            t_f = ops.alloc_fragment((K, BV), ACC)

            v0 = iv * BV
            c0 = seq_chunk0[n]
            nch = seq_nchunks[n]
            load_state_tile(ops, dh, dht, n, hv, v0, has_dht, state_v_first)
            for i in T.serial(nch):
                ic = c0 + nch - 1 - i
                bos = chunk_bos[ic]
                L = chunk_len[ic]
                for r, c in ops.Parallel(C, K):
                    q_s[r, c] = T.if_then_else(r < L, qg[bos + r, hv, c], zero)
                    k_s[r, c] = T.if_then_else(r < L, kg[bos + r, hv, c], zero)
                    w_s[r, c] = T.if_then_else(r < L, w[bos + r, hv, c], zero)
                for r, s in ops.Parallel(C, C):
                    a_s[r, s] = T.if_then_else(r < L, Aqk[bos + r, hv, s], zero)
                for r, j in ops.Parallel(C, BV):
                    do_s[r, j] = T.if_then_else(r < L, T.cast(dO[bos + r, hv, v0 + j], tile), zero)
                for c in ops.Parallel(K):
                    gc_s[c] = gc[ic, hv, c]
                for c, j in ops.Parallel(K, BV):
                    dhn[ic, hv, c, v0 + j] = ops.to_tile(dh[c, j], dtype)
                    dh_s[c, j] = ops.to_tile(dh[c, j], dtype)
                T.clear(dv_f)
                T.gemm(a_s, do_s, dv_f, transpose_A=True)
                T.gemm(k_s, dh_s, dv_f)
                for r, j in ops.Parallel(C, BV):
                    if r < L:
                        dvn[bos + r, hv, v0 + j] = dv_f[r, j]
                for r, j in ops.Parallel(C, BV):
                    dv_s[r, j] = ops.to_tile(-dv_f[r, j], dtype)   # rows past the end are 0 already
                T.clear(t_f)
                T.gemm(q_s, do_s, t_f, transpose_A=True)
                for c, j in ops.Parallel(K, BV):
                    dh[c, j] = dh[c, j] * T.exp(gc_s[c]) + scale * t_f[c, j]
                T.gemm(w_s, dv_s, dh, transpose_A=True)
            if store_dh0:
                for c, j in ops.Parallel(K, BV):
                    store_state_entry(dh0, dh[c, j], n, hv, c, v0 + j, state_v_first)

    return kda_bwd_state
