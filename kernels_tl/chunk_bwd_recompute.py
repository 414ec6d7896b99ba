"""Stage 0 of the TileLang backward: the forward's per-chunk intermediates, recomputed (nothing is stored by the
forward).

* the intra stage as a kernel of its own (:func:`.chunk_intra.kda_intra`; the forward runs it fused) gives
  ``w, u, qg, kg, aqk, gc``;
* ``kda_bwd_states`` (here) walks the state recurrence again and writes what the output fusion of the forward
  never stores: ``h`` (the state entering every chunk, input dtype, ``[chunks, HV, K, V]``) and ``v_new``.
  It is the forward's state kernel without the output: per chunk ``V_new = u - w S``,
  ``S = exp(gc) S + kg^T V_new``.

Rows past a chunk's end belong to the next sequence (or are padding), so every tile is masked on load.
"""

from dataclasses import dataclass

import tilelang.language as T
import torch

from .chunk_intra import kda_intra
from .gate import Prologue
from .state_layout import load_state_tile
from .target import TL_DTYPES, compile_kernel, for_target, ops_for, runtime_sizes

ACC = "float32"


def kda_bwd_states(K: int, V: int, C: int = 64, *, dtype: str = "bfloat16", has_h0: bool = False,
                   state_v_first: bool = False, block_V: int = 32, threads: int = 128, target: str = "cuda"):
    """Kernel factory: the states entering each chunk and V_new.  Kernel config: ``block_V``, ``threads``."""
    ops = ops_for(target)
    BV = block_V
    HV, TP, NC, NS, N0 = runtime_sizes("HV TP NC NS N0")
    state = (HV, V, K) if state_v_first else (HV, K, V)
    tile = ops.tile_dtype(dtype)
    io = ops.tensor_dtype(dtype)   # global tensors of dtype (float32 on the CPU)
    zero = T.cast(0, tile)

    @T.prim_func
    def kda_bwd_states(w: T.Tensor((TP, HV, K), io), u: T.Tensor((TP, HV, V), io),
                       kg: T.Tensor((TP, HV, K), io), gc: T.Tensor((NC, HV, K), ACC),
                       chunk_bos: T.Tensor((NC,), "int32"), chunk_len: T.Tensor((NC,), "int32"),
                       seq_chunk0: T.Tensor((NS,), "int32"), seq_nchunks: T.Tensor((NS,), "int32"),
                       h0: T.Tensor((N0, *state), ACC), h: T.Tensor((NC, HV, K, V), io),
                       v_new: T.Tensor((TP, HV, V), io)):
        with T.Kernel(T.ceildiv(V, BV), HV, NS, threads=threads) as (iv, hv, n):
            w_s = ops.alloc_shared((C, K), tile)
            k_s = ops.alloc_shared((C, K), tile)
            u_s = ops.alloc_shared((C, BV), tile)
            gc_s = ops.alloc_shared((K,), ACC)
            S = ops.alloc_fragment((K, BV), ACC)
            S_s = ops.alloc_shared((K, BV), tile)
            vn_f = ops.alloc_fragment((C, BV), ACC)
            vn_s = ops.alloc_shared((C, BV), tile)

            v0 = iv * BV
            c0 = seq_chunk0[n]
            load_state_tile(ops, S, h0, n, hv, v0, has_h0, state_v_first)
            for i in T.serial(seq_nchunks[n]):
                bos = chunk_bos[c0 + i]
                L = chunk_len[c0 + i]
                for r, c in ops.Parallel(C, K):
                    w_s[r, c] = T.if_then_else(r < L, w[bos + r, hv, c], zero)
                    k_s[r, c] = T.if_then_else(r < L, kg[bos + r, hv, c], zero)
                for r, j in ops.Parallel(C, BV):
                    u_s[r, j] = T.if_then_else(r < L, u[bos + r, hv, v0 + j], zero)
                for c in ops.Parallel(K):
                    gc_s[c] = gc[c0 + i, hv, c]
                for c, j in ops.Parallel(K, BV):
                    h[c0 + i, hv, c, v0 + j] = ops.to_tile(S[c, j], dtype)
                    S_s[c, j] = ops.to_tile(S[c, j], dtype)
                T.clear(vn_f)
                T.gemm(w_s, S_s, vn_f)
                for r, j in ops.Parallel(C, BV):
                    vn_s[r, j] = T.if_then_else(r < L, ops.to_tile(T.cast(u_s[r, j], ACC) - vn_f[r, j], dtype), zero)
                for r, j in ops.Parallel(C, BV):
                    if r < L:
                        v_new[bos + r, hv, v0 + j] = ops.to_tile(vn_s[r, j], dtype)
                for c, j in ops.Parallel(K, BV):
                    S[c, j] = S[c, j] * T.exp(gc_s[c])
                T.gemm(k_s, vn_s, S, transpose_A=True)

    return kda_bwd_states


@dataclass
class Forward:
    """The forward's intermediates on the flat token axis (rows padded to ``TP = TT + C``)."""

    w: torch.Tensor      # [TP, HV, K]
    u: torch.Tensor      # [TP, HV, V]
    qg: torch.Tensor     # [TP, HV, K]
    kg: torch.Tensor     # [TP, HV, K]
    aqk: torch.Tensor    # [TP, HV, C], scale * A_qk
    gc: torch.Tensor     # [chunks, HV, K] float32
    h: torch.Tensor      # [chunks, HV, K, V]
    v_new: torch.Tensor  # [TP, HV, V]


def recompute_forward(flat, dtype: str, a_log, bias, h0, table, opts, prologue: Prologue, target: str,
                      cfg) -> Forward:
    """Run the forward's intra kernel and :func:`kda_bwd_states` on the flat inputs ``flat = (q, k, v, g, beta)``
    (already in the target's dtypes; ``dtype`` the call's, e.g. "bfloat16" also where the C target takes them as
    float32); ``h0`` float32 in the user's state layout or None."""
    q, k, v, g, beta = flat
    TT, _, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    C = opts.chunk_size
    intra = compile_kernel(kda_intra, target, K, V, C, dtype=dtype, g_dtype=TL_DTYPES[g.dtype],
                           beta_dtype=TL_DTYPES[beta.dtype], scale=float(opts.scale), prologue=prologue,
                           threads=cfg.intra_threads)
    TP = TT + C
    f32 = dict(dtype=torch.float32, device=q.device)
    # rows past the last token stay uninitialised: every stage masks rows past a chunk's end by selection
    fwd = Forward(w=q.new_empty(TP, HV, K), u=q.new_empty(TP, HV, V), qg=q.new_empty(TP, HV, K),
                  kg=q.new_empty(TP, HV, K), aqk=q.new_empty(TP, HV, C), gc=torch.empty(table.num_chunks, HV, K, **f32),
                  h=q.new_empty(table.num_chunks, HV, K, V), v_new=q.new_empty(TP, HV, V))
    intra(q, k, v, g, beta, a_log, bias, table.chunk_bos, table.chunk_len, fwd.w, fwd.u, fwd.qg, fwd.kg, fwd.aqk,
          fwd.gc)
    has_h0 = h0 is not None
    state_shape = (HV, V, K) if opts.state_v_first else (HV, K, V)
    states = compile_kernel(kda_bwd_states, target, K, V, C, dtype=dtype, has_h0=has_h0,
                            state_v_first=opts.state_v_first, block_V=min(cfg.states_BV, V))
    h0_arg = h0 if has_h0 else torch.empty(0, *state_shape, **f32)
    states(fwd.w, fwd.u, fwd.kg, fwd.gc, table.chunk_bos, table.chunk_len, table.seq_first, table.seq_chunks,
           h0_arg, fwd.h, fwd.v_new)
    return fwd


def flat_inputs(q, k, v, g, beta, target: str):
    """``(q, k, v, g, beta)`` on the flat token axis, contiguous, in dtypes the kernels for ``target`` take."""
    B, T = q.shape[:2]
    out = [for_target(x.reshape(B * T, *x.shape[2:]), target).contiguous() for x in (q, k, v, g, beta)]
    for i in (3, 4):  # g, beta: any float dtype the kernels compile, else float32
        if out[i].dtype not in TL_DTYPES:
            out[i] = out[i].float()
    return tuple(out)
