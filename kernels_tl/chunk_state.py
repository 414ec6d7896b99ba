"""Stages 2 and 3 of the chunkwise forward, state and output, fused in one kernel (``kda_state_output``).

One program instance per (value-column block, value head, sequence) walks the sequence's chunks in order,
holding its slice of the state ``S [K, block_V]`` in float32 registers.  Per chunk, with the tensors of
:mod:`.chunk_intra`::

    V_new = u - w S                       # what the delta rule writes (docs/algorithm.md)
    O     = scale qg S + aqk V_new        # output of the chunk (aqk already scaled)
    S     = exp(gc) * S + kg^T V_new      # state entering the next chunk

Fusing the output into the recurrence means the per-chunk states and ``V_new`` never go to HBM: each
intermediate is read once and the output written once (the Triton twin splits them into chunk_state.py and
chunk_o.py).  Tensor-core operands are in the input dtype (the state is rounded to it for the products, as
flash-linear-attention does), accumulation is float32.
"""

import itertools

import tilelang.language as T

from .state_layout import load_state_tile, store_state_entry
from .target import ops_for

ACC = "float32"


def kda_state_output(K: int, V: int, C: int = 64, *, dtype: str = "bfloat16", out_dtype: str = "bfloat16",
                     scale: float = 1.0, has_h0: bool = False, store_final: bool = False, state_v_first: bool = False,
                     block_V: int = 64, num_stages: int = 1, threads: int = 128, target: str = "cuda"):
    """Kernel factory for stages 2 and 3.  Kernel config: ``block_V`` (state columns per program), ``num_stages``
    (software pipeline depth of the chunk loads), ``threads``."""
    ops = ops_for(target)
    BV = block_V
    HV = T.dynamic("HV")
    TT = T.dynamic("TT")   # tokens of the output
    TP = T.dynamic("TP")   # rows of the padded intermediates
    NC = T.dynamic("NC")   # chunks
    NS = T.dynamic("NS")   # sequences
    N0 = T.dynamic("N0")   # sequences with an initial state (NS, or 0 when there is none)
    N1 = T.dynamic("N1")   # sequences with a final state (NS, or 0)
    state = (HV, V, K) if state_v_first else (HV, K, V)
    stages = ops.stages(num_stages)
    tile = ops.tile_dtype(dtype)   # on-chip copies and tensor-core operands

    @T.prim_func
    def kda_state_output(w: T.Tensor((TP, HV, K), dtype), u: T.Tensor((TP, HV, V), dtype),
                         qg: T.Tensor((TP, HV, K), dtype), kg: T.Tensor((TP, HV, K), dtype),
                         Aqk: T.Tensor((TP, HV, C), dtype), gc: T.Tensor((NC, HV, K), ACC),
                         chunk_bos: T.Tensor((NC,), "int32"), chunk_len: T.Tensor((NC,), "int32"),
                         seq_chunk0: T.Tensor((NS,), "int32"), seq_nchunks: T.Tensor((NS,), "int32"),
                         h0: T.Tensor((N0, *state), ACC), o: T.Tensor((TT, HV, V), out_dtype),
                         ht: T.Tensor((N1, *state), ACC)):
        with T.Kernel(T.ceildiv(V, BV), HV, NS, threads=threads) as (iv, hv, n):
            w_s = ops.alloc_shared((C, K), tile)
            q_s = ops.alloc_shared((C, K), tile)
            k_s = ops.alloc_shared((C, K), tile)
            u_s = ops.alloc_shared((C, BV), tile)
            a_s = ops.alloc_shared((C, C), tile)
            gc_s = ops.alloc_shared((K,), ACC)
            S = ops.alloc_fragment((K, BV), ACC)
            S_s = ops.alloc_shared((K, BV), tile)
            vn_f = ops.alloc_fragment((C, BV), ACC)
            vn_s = ops.alloc_shared((C, BV), tile)
            o_f = ops.alloc_fragment((C, BV), ACC)

            v0 = iv * BV
            c0 = seq_chunk0[n]
            load_state_tile(ops, S, h0, n, hv, v0, has_h0, state_v_first)
            for i in ops.Pipelined(seq_nchunks[n], num_stages=stages):
                bos = chunk_bos[c0 + i]
                L = chunk_len[c0 + i]
                T.copy(w[bos:bos + C, hv, :], w_s)
                T.copy(qg[bos:bos + C, hv, :], q_s)
                T.copy(kg[bos:bos + C, hv, :], k_s)
                T.copy(u[bos:bos + C, hv, v0:v0 + BV], u_s)
                T.copy(Aqk[bos:bos + C, hv, :], a_s)
                T.copy(gc[c0 + i, hv, :], gc_s)
                for c, j in ops.Parallel(K, BV):
                    S_s[c, j] = ops.to_tile(S[c, j], dtype)
                T.clear(vn_f)
                T.gemm(w_s, S_s, vn_f)
                # rows past the chunk's end hold another sequence's data: zero them on both sides
                for r, j in ops.Parallel(C, BV):
                    vn_s[r, j] = T.if_then_else(r < L, ops.to_tile(T.cast(u_s[r, j], ACC) - vn_f[r, j], dtype),
                                                T.cast(0, tile))
                for r, c in ops.Parallel(C, K):
                    k_s[r, c] = T.if_then_else(r < L, k_s[r, c], T.cast(0, tile))
                T.clear(o_f)
                T.gemm(q_s, S_s, o_f)
                for r, j in ops.Parallel(C, BV):
                    o_f[r, j] = o_f[r, j] * scale
                T.gemm(a_s, vn_s, o_f)
                for r, j in ops.Parallel(C, BV):
                    if r < L:
                        o[bos + r, hv, v0 + j] = T.cast(o_f[r, j], out_dtype)
                for c, j in ops.Parallel(K, BV):
                    S[c, j] = S[c, j] * T.exp(gc_s[c])
                T.gemm(k_s, vn_s, S, transpose_A=True)
            if store_final:
                for c, j in ops.Parallel(K, BV):
                    store_state_entry(ht, S[c, j], n, hv, c, v0 + j, state_v_first)

    return kda_state_output


def get_configs() -> list[dict]:
    """Autotuner search space (kernel config only)."""
    return [dict(state_BV=bv, state_stages=s) for bv, s in itertools.product((16, 32, 64), (1, 2))]
