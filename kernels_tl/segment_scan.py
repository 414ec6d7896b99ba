"""The segment scan's second and third passes (docs/algorithm.md, "Splitting one sequence: the segment scan").

Pass 1 is :func:`.chunk_fused.kda_fused` with ``VA = V + K`` state columns: per segment j it leaves the final
augmented state ``hs[j] = [R_j | M_j]`` (K-first, float32), local outputs in ``o`` and the scaled effective
queries ``qt_t = scale M_t^T q_t``.

* ``kda_segment_scan``, one program per (column block, value head, sequence): walks the sequence's segments in
  order, ``S_in(j) = S``, ``S = M_j S + R_j`` (the first segment already started from the initial state, so
  ``S = R_0`` to begin with); writes every ``S_in`` and the final state (user layout).
* ``kda_segment_fixup``, one program per (column block, value head, chunk) of a segment that is not its
  sequence's first: ``o += qt S_in``, one [C, K] x [K, block_V] product.
"""

import tilelang.language as T

from .state_layout import store_state_entry
from .target import ops_for, runtime_sizes

ACC = "float32"


def kda_segment_scan(K: int, V: int, *, state_v_first: bool = False, block_V: int = 64, threads: int = 128,
                     target: str = "cuda"):
    """Kernel factory of the scan over segments (products ``M_j S`` in float32 operands: TF32 on the GPU)."""
    ops = ops_for(target)
    BV = block_V
    HV, NSEG, NS, VA = runtime_sizes("HV NSEG NS VA")
    state = (HV, V, K) if state_v_first else (HV, K, V)

    @T.prim_func
    def kda_segment_scan(hs: T.Tensor((NSEG, HV, K, VA), ACC), seq_seg0: T.Tensor((NS,), "int32"),
                         seq_nsegs: T.Tensor((NS,), "int32"), s_in: T.Tensor((NSEG, HV, K, V), ACC),
                         ht: T.Tensor((NS, *state), ACC)):
        with T.Kernel(T.ceildiv(V, BV), HV, NS, threads=threads) as (iv, hv, n):
            v0 = iv * BV
            j0 = seq_seg0[n]           # the sequence's first segment: its state is final, nothing to add
            S = ops.alloc_fragment((K, BV), ACC)
            M_s = ops.alloc_shared((K, K), ACC)
            S_s = ops.alloc_shared((K, BV), ACC)
            for c, j in ops.Parallel(K, BV):
                S[c, j] = hs[j0, hv, c, v0 + j]
            for i in T.serial(seq_nsegs[n] - 1):
                seg = j0 + 1 + i
                for c, j in ops.Parallel(K, BV):
                    s_in[seg, hv, c, v0 + j] = S[c, j]
                    S_s[c, j] = S[c, j]
                for a, b in ops.Parallel(K, K):
                    M_s[a, b] = hs[seg, hv, a, V + b]
                for c, j in ops.Parallel(K, BV):
                    S[c, j] = hs[seg, hv, c, v0 + j]
                T.gemm(M_s, S_s, S)
            for c, j in ops.Parallel(K, BV):
                store_state_entry(ht, S[c, j], n, hv, c, v0 + j, state_v_first)

    return kda_segment_scan


def kda_segment_fixup(K: int, V: int, C: int = 64, *, dtype: str = "bfloat16", block_V: int = 64,
                      threads: int = 128, target: str = "cuda"):
    """Kernel factory of the fix-up ``o += qt S_in`` (``qt`` already carries the scale)."""
    ops = ops_for(target)
    BV = block_V
    HV, TT, NC, NSEG = runtime_sizes("HV TT NC NSEG")
    tile = ops.tile_dtype(dtype)
    io = ops.tensor_dtype(dtype)   # global tensors of dtype (float32 on the CPU)

    @T.prim_func
    def kda_segment_fixup(qt: T.Tensor((TT, HV, K), io), s_in: T.Tensor((NSEG, HV, K, V), ACC),
                          chunk_bos: T.Tensor((NC,), "int32"), chunk_len: T.Tensor((NC,), "int32"),
                          chunk_seg: T.Tensor((NC,), "int32"), seg_first: T.Tensor((NSEG,), "int32"),
                          o: T.Tensor((TT, HV, V), io)):
        with T.Kernel(T.ceildiv(V, BV), HV, NC, threads=threads) as (iv, hv, ic):
            q_s = ops.alloc_shared((C, K), tile)
            S_s = ops.alloc_shared((K, BV), tile)
            o_f = ops.alloc_fragment((C, BV), ACC)
            v0 = iv * BV
            seg = chunk_seg[ic]
            bos = chunk_bos[ic]
            L = chunk_len[ic]
            if seg_first[seg] == 0:
                for r, c in ops.Parallel(C, K):
                    q_s[r, c] = T.if_then_else(r < L, T.cast(qt[bos + r, hv, c], tile), T.cast(0, tile))
                for c, j in ops.Parallel(K, BV):
                    S_s[c, j] = ops.to_tile(s_in[seg, hv, c, v0 + j], dtype)
                T.clear(o_f)
                T.gemm(q_s, S_s, o_f)
                for r, j in ops.Parallel(C, BV):
                    if r < L:
                        o[bos + r, hv, v0 + j] = ops.to_tile(T.cast(o[bos + r, hv, v0 + j], ACC) + o_f[r, j], dtype)

    return kda_segment_fixup
