"""Decode kernel: the token recurrence for a few tokens per sequence, state in/out (optionally in place).

One program instance per (value-column block, value head, sequence) holds the state slice
``S [K, block_V]`` in float32 registers (spread over its threads) and walks the sequence's tokens (design.md
section 1); the dot products over K are block reductions::

    S      = diag(exp(g_t)) S
    u_j    = beta_t (v_t[j] - k_t . S[:, j])
    S[:,j] = S[:, j] + k_t u_j
    o_t[j] = scale * q_t . S[:, j]

The state is read once and written once per call, so the kernel is bound by the state's bytes; prologues
(gate, L2 norm, beta sigmoid) are fused.  Serving: ``slots[n]`` picks the state slot of sequence ``n`` in a
pool (continuous batching; identity without a pool) and ``inplace`` writes the new state back into that
slot instead of a separate output.
"""
import itertools

import tilelang.language as T
import torch

from .gate import Prologue, beta_value, inv_norm, log_decay
from .target import TL_DTYPES, compile_kernel, for_target, ops_for, target_for

ACC = "float32"


def fused_recurrent(K: int, V: int, *, dtype: str = "bfloat16", g_dtype: str = "float32",
                    beta_dtype: str = "float32", scale: float = 1.0, prologue: Prologue = Prologue(),
                    has_h0: bool = False, store_final: bool = False, inplace: bool = False,
                    state_v_first: bool = False, block_V: int = 32, threads: int = 128,
                    target: str = "cuda"):
    """Kernel factory for decode.  Kernel config: ``block_V`` (state columns per program), ``threads``."""
    ops = ops_for(target)
    p = prologue
    H = T.dynamic("H")
    HV = T.dynamic("HV")
    BV = block_V
    TT = T.dynamic("TT")
    NS = T.dynamic("NS")
    P0 = T.dynamic("P0")   # state pool rows (N without a pool, 0 without an initial state)
    N1 = T.dynamic("N1")   # final-state rows (N, or 0)
    state = (HV, V, K) if state_v_first else (HV, K, V)

    @T.prim_func
    def kernel(q: T.Tensor((TT, H, K), dtype), k: T.Tensor((TT, H, K), dtype), v: T.Tensor((TT, HV, V), dtype),
               g: T.Tensor((TT, HV, K), g_dtype), beta: T.Tensor((TT, HV), beta_dtype),
               A_log: T.Tensor((HV,), ACC), dt_bias: T.Tensor((HV, K), ACC),
               seq_bos: T.Tensor((NS,), "int32"), seq_len: T.Tensor((NS,), "int32"),
               slots: T.Tensor((NS,), "int32"), h0: T.Tensor((P0, *state), ACC),
               o: T.Tensor((TT, HV, V), dtype), ht: T.Tensor((N1, *state), ACC)):
        with T.Kernel(T.ceildiv(V, BV), HV, NS, threads=threads) as (iv, hv, n):
            S = ops.alloc_fragment((K, BV), ACC)
            P = ops.alloc_fragment((K, BV), ACC)
            qs = ops.alloc_shared((K,), ACC)
            ks = ops.alloc_shared((K,), ACC)
            es = ops.alloc_shared((K,), ACC)        # exp(g_t)
            vs = ops.alloc_shared((BV,), ACC)
            acc = ops.alloc_fragment((BV,), ACC)
            nq = ops.alloc_fragment((BV,), ACC)     # L2-norm factors (the same in every column)
            nk = ops.alloc_fragment((BV,), ACC)
            ub = ops.alloc_fragment((BV,), ACC)
            v0 = iv * BV
            h = hv // (HV // H)
            bos = seq_bos[n]
            slot = slots[n]
            if has_h0:
                for c, j in ops.Parallel(K, BV):
                    S[c, j] = state_entry(h0, slot, hv, c, v0 + j, state_v_first)
            else:
                T.clear(S)
            for t in T.serial(seq_len[n]):
                for c in ops.Parallel(K):
                    qs[c] = T.cast(q[bos + t, h, c], ACC)
                    ks[c] = T.cast(k[bos + t, h, c], ACC)
                    es[c] = T.exp(log_decay(p, T.cast(g[bos + t, hv, c], ACC), A_log[hv], dt_bias[hv, c]))
                for j in ops.Parallel(BV):
                    vs[j] = T.cast(v[bos + t, hv, v0 + j], ACC)
                if p.l2norm:
                    for c, j in ops.Parallel(K, BV):
                        P[c, j] = qs[c] * qs[c]
                    ops.colsum(P, nq)
                    for c, j in ops.Parallel(K, BV):
                        P[c, j] = ks[c] * ks[c]
                    ops.colsum(P, nk)
                    for j in ops.Parallel(BV):
                        nq[j] = inv_norm(nq[j])
                        nk[j] = inv_norm(nk[j])
                else:
                    for j in ops.Parallel(BV):
                        nq[j] = 1.0
                        nk[j] = 1.0
                for c, j in ops.Parallel(K, BV):
                    S[c, j] = S[c, j] * es[c]
                    P[c, j] = ks[c] * S[c, j]
                ops.colsum(P, acc)
                # delta rule with the normalised key nk * k: u = beta (v - nk k.S), S += (nk k) u
                for j in ops.Parallel(BV):
                    ub[j] = beta_value(p, T.cast(beta[bos + t, hv], ACC)) * (vs[j] - nk[j] * acc[j]) * nk[j]
                for c, j in ops.Parallel(K, BV):
                    S[c, j] = S[c, j] + ks[c] * ub[j]
                    P[c, j] = qs[c] * S[c, j]
                ops.colsum(P, acc)
                for j in ops.Parallel(BV):
                    o[bos + t, hv, v0 + j] = T.cast(acc[j] * nq[j] * scale, dtype)
            if inplace:
                for c, j in ops.Parallel(K, BV):
                    if state_v_first:
                        h0[slot, hv, v0 + j, c] = S[c, j]
                    else:
                        h0[slot, hv, c, v0 + j] = S[c, j]
            if store_final:
                for c, j in ops.Parallel(K, BV):
                    if state_v_first:
                        ht[n, hv, v0 + j, c] = S[c, j]
                    else:
                        ht[n, hv, c, v0 + j] = S[c, j]

    return kernel


def state_entry(h0, slot, hv, c, column, state_v_first: bool):
    """``S[c, column]`` of head ``hv`` in pool row ``slot`` (the state is ``[K, V]``, or ``[V, K]`` V-first)."""
    return h0[slot, hv, column, c] if state_v_first else h0[slot, hv, c, column]


def fused_recurrent_columns(K: int, V: int, *, dtype: str = "bfloat16", g_dtype: str = "float32",
                            beta_dtype: str = "float32", scale: float = 1.0, prologue: Prologue = Prologue(),
                            has_h0: bool = False, store_final: bool = False, inplace: bool = False,
                            state_v_first: bool = False, block_V: int = 64, target: str = "cuda"):
    """Decode kernel, one thread per state column: thread ``j`` keeps ``S[:, j]`` (K floats) in registers,
    so the dot products over K need no cross-thread reduction (threads = ``block_V``).  On the C target the
    per-thread arrays become one ``[block_V, K]`` array."""
    ops = ops_for(target)
    p = prologue
    BV = block_V
    H = T.dynamic("H")
    HV = T.dynamic("HV")
    TT = T.dynamic("TT")
    NS = T.dynamic("NS")
    P0 = T.dynamic("P0")
    N1 = T.dynamic("N1")
    state = (HV, V, K) if state_v_first else (HV, K, V)
    loop_k = T.serial if ops.cpu else T.unroll   # unrolled: the column stays in registers

    def col(j, c):   # index of S[c, j] in the per-thread column (per-program array on the CPU)
        return (j, c) if ops.cpu else (c,)

    def one(j):      # index of a per-thread scalar
        return (j,) if ops.cpu else (0,)

    @T.prim_func
    def kernel(q: T.Tensor((TT, H, K), dtype), k: T.Tensor((TT, H, K), dtype), v: T.Tensor((TT, HV, V), dtype),
               g: T.Tensor((TT, HV, K), g_dtype), beta: T.Tensor((TT, HV), beta_dtype),
               A_log: T.Tensor((HV,), ACC), dt_bias: T.Tensor((HV, K), ACC),
               seq_bos: T.Tensor((NS,), "int32"), seq_len: T.Tensor((NS,), "int32"),
               slots: T.Tensor((NS,), "int32"), h0: T.Tensor((P0, *state), ACC),
               o: T.Tensor((TT, HV, V), dtype), ht: T.Tensor((N1, *state), ACC)):
        with T.Kernel(T.ceildiv(V, BV), HV, NS, threads=BV) as (iv, hv, n):
            S = T.alloc_local((BV, K) if ops.cpu else (K,), ACC)
            acc = T.alloc_local((BV,) if ops.cpu else (1,), ACC)
            ub = T.alloc_local((BV,) if ops.cpu else (1,), ACC)
            nq = T.alloc_local((BV,) if ops.cpu else (1,), ACC)   # L2-norm factors of q_t and k_t
            nk = T.alloc_local((BV,) if ops.cpu else (1,), ACC)
            qs = ops.alloc_shared((K,), ACC)
            ks = ops.alloc_shared((K,), ACC)
            es = ops.alloc_shared((K,), ACC)        # exp(g_t)
            v0 = iv * BV
            h = hv // (HV // H)
            bos = seq_bos[n]
            slot = slots[n]
            # Load the state columns.  On the GPU the thread index is bound explicitly: this loop writes only
            # the thread's own registers, and a T.Parallel over j was lowered to a serial loop in every
            # thread (each thread ended up holding column BV-1; found in the sm_90a source).
            if ops.cpu:
                for j in T.serial(BV):
                    for c in loop_k(K):
                        S[col(j, c)] = state_entry(h0, slot, hv, c, v0 + j, state_v_first) if has_h0 else 0.0
            else:
                tx = T.get_thread_binding()
                for c in loop_k(K):
                    S[col(tx, c)] = state_entry(h0, slot, hv, c, v0 + tx, state_v_first) if has_h0 else 0.0
            for t in T.serial(seq_len[n]):
                for c in ops.Parallel(K):
                    qs[c] = T.cast(q[bos + t, h, c], ACC)
                    ks[c] = T.cast(k[bos + t, h, c], ACC)
                    es[c] = T.exp(log_decay(p, T.cast(g[bos + t, hv, c], ACC), A_log[hv], dt_bias[hv, c]))
                for j in ops.Parallel(BV):
                    # every thread also sums q^2 and k^2 itself (independent chains beside the dot product,
                    # so the L2 norms cost no barrier and no extra latency)
                    acc[one(j)] = 0.0
                    nq[one(j)] = 0.0
                    nk[one(j)] = 0.0
                    for c in loop_k(K):
                        S[col(j, c)] = S[col(j, c)] * es[c]
                        acc[one(j)] = acc[one(j)] + ks[c] * S[col(j, c)]
                        if p.l2norm:
                            nq[one(j)] = nq[one(j)] + qs[c] * qs[c]
                            nk[one(j)] = nk[one(j)] + ks[c] * ks[c]
                    if p.l2norm:
                        nq[one(j)] = inv_norm(nq[one(j)])
                        nk[one(j)] = inv_norm(nk[one(j)])
                    else:
                        nq[one(j)] = 1.0
                        nk[one(j)] = 1.0
                    # delta rule with the normalised key nk * k
                    ub[one(j)] = beta_value(p, T.cast(beta[bos + t, hv], ACC)) * nk[one(j)] * (
                        T.cast(v[bos + t, hv, v0 + j], ACC) - nk[one(j)] * acc[one(j)])
                    acc[one(j)] = 0.0
                    for c in loop_k(K):
                        S[col(j, c)] = S[col(j, c)] + ks[c] * ub[one(j)]
                        acc[one(j)] = acc[one(j)] + qs[c] * S[col(j, c)]
                    o[bos + t, hv, v0 + j] = T.cast(acc[one(j)] * nq[one(j)] * scale, dtype)
            for j in ops.Parallel(BV):
                for c in loop_k(K):
                    if inplace:
                        if state_v_first:
                            h0[slot, hv, v0 + j, c] = S[col(j, c)]
                        else:
                            h0[slot, hv, c, v0 + j] = S[col(j, c)]
                    if store_final:
                        if state_v_first:
                            ht[n, hv, v0 + j, c] = S[col(j, c)]
                        else:
                            ht[n, hv, c, v0 + j] = S[col(j, c)]

    return kernel


def get_configs() -> list[dict]:
    """Autotuner search space (kernel config only)."""
    tiles = [dict(layout="tile", block_V=bv, threads=t) for bv, t in itertools.product((16, 32, 64), (64, 128, 256))]
    columns = [dict(layout="column", block_V=bv, threads=bv) for bv in (32, 64, 128)]
    return columns + tiles


DEFAULT_CONFIG = {"layout": "column", "block_V": 128, "threads": 128}


def fused_recurrent_fwd(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts,
                        output_final_state: bool, slots=None, inplace: bool = False, config: dict | None = None):
    """Token recurrence with the TileLang decode kernel; returns ``(o, final_state or None)``.

    ``slots`` (int tensor ``[N]``) picks each sequence's row of ``initial_state`` (a state pool); with
    ``inplace`` the new state is written back into that row of ``initial_state``."""
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    B, T_, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    device = q.device
    TT = B * T_
    if cu_seqlens is None:
        seq_bos = torch.arange(0, TT, T_ if T_ else 1, dtype=torch.int32, device=device)[:B]
        seq_len = torch.full((B,), T_, dtype=torch.int32, device=device)
    else:
        offsets = cu_seqlens.to(device=device, dtype=torch.int32)
        seq_bos, seq_len = offsets[:-1].contiguous(), (offsets[1:] - offsets[:-1]).contiguous()
    N = seq_bos.numel()
    slots = (torch.arange(N, dtype=torch.int32, device=device) if slots is None
             else slots.to(device=device, dtype=torch.int32).contiguous())
    prologue = Prologue.from_call(opts, A_log is not None, dt_bias is not None)
    f32 = dict(dtype=torch.float32, device=device)
    a_log = A_log.reshape(HV).to(**f32).contiguous() if prologue.has_A_log else torch.zeros(HV, **f32)
    bias = dt_bias.reshape(HV, K).to(**f32).contiguous() if prologue.has_dt_bias else torch.zeros(HV, K, **f32)
    target = target_for(device)
    qf, kf = (for_target(x.reshape(TT, H, K), target).contiguous() for x in (q, k))
    vf = for_target(v.reshape(TT, HV, V), target).contiguous()
    gf = for_target(g.reshape(TT, HV, K), target).contiguous()
    bf = for_target(beta.reshape(TT, HV), target).contiguous()
    gf = gf if gf.dtype in TL_DTYPES else gf.float()
    bf = bf if bf.dtype in TL_DTYPES else bf.float()
    state_shape = (HV, V, K) if opts.state_v_first else (HV, K, V)
    has_h0 = initial_state is not None
    if inplace and (initial_state.dtype != torch.float32 or not initial_state.is_contiguous()):
        raise ValueError("inplace_final_state needs a contiguous float32 initial_state")
    h0 = (initial_state if inplace else initial_state.to(torch.float32).contiguous()) if has_h0 \
        else torch.empty(0, *state_shape, **f32)
    ht = torch.empty(N, *state_shape, **f32) if output_final_state else torch.empty(0, *state_shape, **f32)
    block_V = min(cfg["block_V"], V)
    common = dict(dtype=TL_DTYPES[qf.dtype], g_dtype=TL_DTYPES[gf.dtype], beta_dtype=TL_DTYPES[bf.dtype],
                  scale=float(opts.scale), prologue=prologue, has_h0=has_h0, store_final=output_final_state,
                  inplace=inplace, state_v_first=opts.state_v_first, block_V=block_V)
    if cfg["layout"] == "column":
        kernel = compile_kernel(fused_recurrent_columns, target, K, V, **common)
    else:
        kernel = compile_kernel(fused_recurrent, target, K, V, threads=cfg["threads"], **common)
    o = torch.empty(TT, HV, V, dtype=vf.dtype, device=device)
    kernel(qf, kf, vf, gf, bf, a_log, bias, seq_bos, seq_len, slots, h0, o, ht)
    return o.view(B, T_, HV, V).to(v.dtype), (ht if output_final_state else None)
