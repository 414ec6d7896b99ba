"""Decode kernels: the token recurrence for a few tokens per sequence, state in/out (optionally in place).

One program instance per (value-column block, value head, sequence) holds the state slice
``S [K, block_V]`` in float32 registers (spread over its threads) and walks the sequence's tokens
(docs/algorithm.md); the dot products over K are block reductions (``kda_decode``; ``kda_decode_columns`` keeps
one column per thread instead)::

    S      = diag(exp(g_t)) S
    u_j    = beta_t (v_t[j] - k_t . S[:, j])
    S[:,j] = S[:, j] + k_t u_j
    o_t[j] = scale * q_t . S[:, j]

The state is read once and written once per call, so the kernel is bound by the state's bytes; prologues
(gate, L2 norm, beta sigmoid) are fused.  Serving (:mod:`.decode_slots`): ``slots`` picks the state slot of
sequence ``n`` in a pool (``ssm_state_indices``, continuous batching; identity without a pool) and ``inplace``
writes the final state back into that slot instead of a separate output (``inplace_final_state``).  Speculative
decoding gives a slot per draft token (``slots [N, S]``, the initial one in column ``accepted[n] - 1``) and, in
place, stores the state after every token in its slot; a negative initial slot is padding (zero output and
state, no state access).  Each program owns distinct (head, column) entries of a slot, so reading and writing
one pool is race-free between programs.
"""
import itertools

import tilelang.language as T
import torch

from .config import decode_config
from .decode_slots import SlotMode, initial_slot, is_live, live_tokens, slot_tensors, token_slot
from .gate import Prologue, beta_value, inv_norm, log_decay, vector_inv_norm
from .state_layout import load_state_tile, state_entry, store_state_entry
from .target import TL_DTYPES, compile_kernel, flat_inputs, ops_for, runtime_sizes, target_for

ACC = "float32"


@T.macro
def load_token(ops, p: Prologue, q, k, g, A_log, dt_bias, qs, ks, es, t, h, hv):
    """Token ``t`` of key head ``h`` / value head ``hv`` into float32 ``qs``, ``ks`` and ``es = exp(g_t)`` (the gate
    applied when the prologue asks for it)."""
    for c in ops.Parallel(qs.shape[0]):
        qs[c] = T.cast(q[t, h, c], ACC)
        ks[c] = T.cast(k[t, h, c], ACC)
        es[c] = T.exp(log_decay(p, T.cast(g[t, hv, c], ACC), A_log[hv], dt_bias[hv, c]))


@T.macro
def zero_padding_outputs(ops, o, slot, bos, tokens, hv, v0, width: int):
    """A padding sequence (negative ``slot``) outputs zeros: columns ``v0 .. v0 + width`` of head ``hv``."""
    if slot < 0:
        for t in T.serial(tokens):
            for j in ops.Parallel(width):
                o[bos + t, hv, v0 + j] = T.cast(0.0, o.dtype)


def kda_decode(K: int, V: int, *, dtype: str = "bfloat16", g_dtype: str = "float32",
                    beta_dtype: str = "float32", scale: float = 1.0, prologue: Prologue = Prologue(),
                    has_h0: bool = False, store_final: bool = False, inplace: bool = False,
                    slot_mode: SlotMode = SlotMode(), state_v_first: bool = False, block_V: int = 32,
                    threads: int = 128, target: str = "cuda"):
    """Kernel factory for decode.  ``inplace``: the final state to the initial slot; ``slot_mode``: pool,
    speculative-decoding and padding switches (:class:`.decode_slots.SlotMode`).  Kernel config: ``block_V``
    (state columns per program), ``threads``."""
    ops = ops_for(target)
    p = prologue
    H, HV = runtime_sizes("H HV")
    BV = block_V
    TT, NS, P0, N1, SC, NA = runtime_sizes("TT NS P0 N1 SC NA")
    state = (HV, V, K) if state_v_first else (HV, K, V)
    slot_table = (NS, SC) if slot_mode.columns else (NS,)

    @T.prim_func
    def kda_decode(q: T.Tensor((TT, H, K), dtype), k: T.Tensor((TT, H, K), dtype), v: T.Tensor((TT, HV, V), dtype),
                   g: T.Tensor((TT, HV, K), g_dtype), beta: T.Tensor((TT, HV), beta_dtype),
                   A_log: T.Tensor((HV,), ACC), dt_bias: T.Tensor((HV, K), ACC),
                   seq_bos: T.Tensor((NS,), "int32"), seq_len: T.Tensor((NS,), "int32"),
                   slots: T.Tensor(slot_table, "int32"), accepted: T.Tensor((NA,), "int32"),
                   h0: T.Tensor((P0, *state), ACC), o: T.Tensor((TT, HV, V), dtype),
                   ht: T.Tensor((N1, *state), ACC)):
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
            slot = initial_slot(slot_mode, slots, accepted, n)
            load_state_tile(ops, S, h0, slot, hv, v0, has_h0, state_v_first, slot_mode.padding)
            if slot_mode.padding:
                zero_padding_outputs(ops, o, slot, bos, seq_len[n], hv, v0, BV)
            for t in T.serial(live_tokens(slot_mode, slot, seq_len[n])):
                load_token(ops, p, q, k, g, A_log, dt_bias, qs, ks, es, bos + t, h, hv)
                for j in ops.Parallel(BV):
                    vs[j] = T.cast(v[bos + t, hv, v0 + j], ACC)
                if p.l2norm:
                    vector_inv_norm(ops, qs, P, nq)
                    vector_inv_norm(ops, ks, P, nk)
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
                if slot_mode.per_token:  # speculative decoding: the state after token t to its own slot
                    next_slot = token_slot(slots, n, t)
                    for c, j in ops.Parallel(K, BV):
                        if next_slot >= 0:
                            store_state_entry(h0, S[c, j], next_slot, hv, c, v0 + j, state_v_first)
            if inplace:
                for c, j in ops.Parallel(K, BV):
                    if is_live(slot_mode, slot):
                        store_state_entry(h0, S[c, j], slot, hv, c, v0 + j, state_v_first)
            if store_final:
                for c, j in ops.Parallel(K, BV):
                    store_state_entry(ht, S[c, j], n, hv, c, v0 + j, state_v_first)

    return kda_decode


def kda_decode_columns(K: int, V: int, *, dtype: str = "bfloat16", g_dtype: str = "float32",
                            beta_dtype: str = "float32", scale: float = 1.0, prologue: Prologue = Prologue(),
                            has_h0: bool = False, store_final: bool = False, inplace: bool = False,
                            slot_mode: SlotMode = SlotMode(), state_v_first: bool = False, block_V: int = 64,
                            target: str = "cuda"):
    """Decode kernel, one thread per state column: thread ``j`` keeps ``S[:, j]`` (K floats) in registers,
    so the dot products over K need no cross-thread reduction (threads = ``block_V``).  On the C target the
    per-thread arrays become one ``[block_V, K]`` array.  The switches are those of :func:`kda_decode`."""
    ops = ops_for(target)
    p = prologue
    BV = block_V
    H, HV, TT, NS, P0, N1, SC, NA = runtime_sizes("H HV TT NS P0 N1 SC NA")
    state = (HV, V, K) if state_v_first else (HV, K, V)
    slot_table = (NS, SC) if slot_mode.columns else (NS,)
    skip = slot_mode.padding   # a negative initial slot reads nothing
    loop_k = T.serial if ops.cpu else T.unroll   # unrolled: the column stays in registers

    def col(j, c):   # index of S[c, j] in the per-thread column (per-program array on the CPU)
        return (j, c) if ops.cpu else (c,)

    def one(j):      # index of a per-thread scalar
        return (j,) if ops.cpu else (0,)

    @T.macro
    def load_column(S, h0, slot, hv, v0, j):
        """Column ``j`` of the program's state slice from the initial slot (zeros without one)."""
        for c in loop_k(K):
            S[col(j, c)] = state_entry(h0, slot, hv, c, v0 + j, state_v_first, skip) if has_h0 else 0.0

    @T.macro
    def store_column(S, h0, ht, slot, n, hv, v0, j):
        """Column ``j`` of the final state: back to the initial slot (``inplace``) and/or to row ``n`` of ``ht``."""
        for c in loop_k(K):
            if inplace:
                if is_live(slot_mode, slot):
                    store_state_entry(h0, S[col(j, c)], slot, hv, c, v0 + j, state_v_first)
            if store_final:
                store_state_entry(ht, S[col(j, c)], n, hv, c, v0 + j, state_v_first)

    @T.prim_func
    def kda_decode_columns(q: T.Tensor((TT, H, K), dtype), k: T.Tensor((TT, H, K), dtype),
                           v: T.Tensor((TT, HV, V), dtype), g: T.Tensor((TT, HV, K), g_dtype),
                           beta: T.Tensor((TT, HV), beta_dtype), A_log: T.Tensor((HV,), ACC),
                           dt_bias: T.Tensor((HV, K), ACC), seq_bos: T.Tensor((NS,), "int32"),
                           seq_len: T.Tensor((NS,), "int32"), slots: T.Tensor(slot_table, "int32"),
                           accepted: T.Tensor((NA,), "int32"), h0: T.Tensor((P0, *state), ACC),
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
            slot = initial_slot(slot_mode, slots, accepted, n)
            # Load the state columns.  On the GPU the thread index is bound explicitly: this loop touches
            # only the thread's own registers, and a T.Parallel over j was lowered to a serial
            # loop in every thread (each thread ended up holding column BV-1; found in the sm_90a source).
            if ops.cpu:
                for j in T.serial(BV):
                    load_column(S, h0, slot, hv, v0, j)
            else:
                load_column(S, h0, slot, hv, v0, T.get_thread_binding())
            if slot_mode.padding:
                zero_padding_outputs(ops, o, slot, bos, seq_len[n], hv, v0, BV)
            for t in T.serial(live_tokens(slot_mode, slot, seq_len[n])):
                load_token(ops, p, q, k, g, A_log, dt_bias, qs, ks, es, bos + t, h, hv)
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
                    if slot_mode.per_token:  # speculative decoding: the state after token t to its own slot
                        next_slot = token_slot(slots, n, t)
                        if next_slot >= 0:
                            for c in loop_k(K):
                                store_state_entry(h0, S[col(j, c)], next_slot, hv, c, v0 + j, state_v_first)
            # the final stores read only the thread's own registers too: the same explicit binding (a
            # T.Parallel here had every thread store every column of the output with its own values)
            if ops.cpu:
                for j in T.serial(BV):
                    store_column(S, h0, ht, slot, n, hv, v0, j)
            else:
                store_column(S, h0, ht, slot, n, hv, v0, T.get_thread_binding())

    return kda_decode_columns


def get_configs() -> list[dict]:
    """Autotuner search space (kernel config only)."""
    tiles = [dict(layout="tile", decode_BV=bv, decode_threads=t) for bv, t in itertools.product((16, 32, 64), (64, 128, 256))]
    columns = [dict(layout="column", decode_BV=bv, decode_threads=bv) for bv in (32, 64, 128)]
    return columns + tiles


def fused_recurrent_kda_fwd(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts, *,
                            output_final_state: bool, ssm_state_indices=None, num_accepted_tokens=None,
                            inplace_final_state: bool = False, config: dict | None = None):
    """Token recurrence with the TileLang decode kernel; returns ``(o, final_state or None)`` (same signature and
    serving semantics as the Triton twin, :mod:`.decode_slots`).  ``ssm_state_indices`` picks each sequence's
    rows of ``initial_state`` (a state pool): ``[N]`` one slot per sequence, ``[N, S]`` one per draft token with
    the initial state in column ``num_accepted_tokens[n] - 1`` (speculative decoding).  With
    ``inplace_final_state`` the new states are written into the pool (1-D: the final state to ``idx[n]``; 2-D:
    the state after token t to ``idx[n, t]``) and the returned state is None."""
    cfg = decode_config(config)
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
    slot_mode = SlotMode.from_call(ssm_state_indices, num_accepted_tokens, inplace_final_state)
    slots, accepted = slot_tensors(ssm_state_indices, num_accepted_tokens, N, device)
    inplace = inplace_final_state and not slot_mode.per_token   # the final state back to the initial slot
    store_final = output_final_state and not inplace_final_state
    f32 = dict(dtype=torch.float32, device=device)
    target = target_for(device)
    x = flat_inputs(q, k, v, g, beta, A_log, dt_bias, opts, target)
    qf, kf, vf, gf, bf, a_log, bias, prologue = x.q, x.k, x.v, x.g, x.beta, x.a_log, x.dt_bias, x.prologue
    state_shape = (HV, V, K) if opts.state_v_first else (HV, K, V)
    has_h0 = initial_state is not None
    if inplace_final_state and (initial_state.dtype != torch.float32 or not initial_state.is_contiguous()):
        raise ValueError("inplace_final_state needs a contiguous float32 initial_state")
    h0 = (initial_state if inplace_final_state else initial_state.to(torch.float32).contiguous()) if has_h0 \
        else torch.empty(0, *state_shape, **f32)
    ht = torch.empty(N, *state_shape, **f32) if store_final else torch.empty(0, *state_shape, **f32)
    common = dict(dtype=TL_DTYPES[qf.dtype], g_dtype=TL_DTYPES[gf.dtype], beta_dtype=TL_DTYPES[bf.dtype],
                  scale=float(opts.scale), prologue=prologue, has_h0=has_h0, store_final=store_final,
                  inplace=inplace, slot_mode=slot_mode, state_v_first=opts.state_v_first,
                  block_V=min(cfg.decode_BV, V))
    if cfg.layout == "column":
        kernel = compile_kernel(kda_decode_columns, target, K, V, **common)
    else:
        kernel = compile_kernel(kda_decode, target, K, V, threads=cfg.decode_threads, **common)
    o = torch.empty(TT, HV, V, dtype=vf.dtype, device=device)
    kernel(qf, kf, vf, gf, bf, a_log, bias, seq_bos, seq_len, slots, accepted, h0, o, ht)
    return o.view(B, T_, HV, V).to(v.dtype), (ht if store_final else None)
