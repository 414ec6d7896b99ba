"""Decode kernel (Triton): the token recurrence for a few tokens per sequence, state in/out.

One program per (V block, sequence, value head) keeps its ``[K, BV]`` slice of the float32 state in
registers and runs the definition (docs/algorithm.md) token by token, with every prologue fused (q/k L2
norm, gate from A_log/dt_bias/lower_bound, beta sigmoid):

    S <- diag(exp(g_t)) S;  S <- S + beta_t k_t (v_t - S^T k_t)^T;  o_t = scale S^T q_t

Serving features (same semantics as the reference backend): ``ssm_state_indices [N]`` picks the pool slot
of sequence n; ``[N, S]`` indices keep one slot per draft token, the initial state is read from column
``num_accepted_tokens[n] - 1`` (column 0 without it) and, in place, the state after token t is written to
slot ``idx[n, t]``; with 1-D indices the final state goes back to ``idx[n]``.  A negative (initial) slot is
padding: that sequence reads and writes nothing and its output and final state are zeros; a negative
per-token slot is not written.  Each program owns distinct
(head, V-column) entries of a slot, so reading and writing the same pool is race-free between programs.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .config import decode_config
from .gate import L2NORM_EPS, gate_value, interpreting


def get_configs() -> list[dict]:
    """Search space of the decode kernel: V-block width and warps."""
    return [{"decode_BV": bv, "decode_warps": w} for bv in (8, 16, 32, 64) for w in (1, 2, 4)]


@triton.jit
def _token_step(q, k, v, g, beta, o, A_log, dt_bias, pool, idx, b_s, t, bos, i_n, i_h, i_kh, o_k, m_k, o_v, m_v,
                scale, lower_bound, s_k, s_v, idx_cols,
                H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                L2NORM: tl.constexpr, USE_GATE: tl.constexpr, USE_LB: tl.constexpr, HAS_A: tl.constexpr,
                HAS_BIAS: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr,
                STORE_EACH: tl.constexpr):
    """One token of the recurrence; returns the new state slice."""
    t = t.to(tl.int64)
    b_q = tl.load(q + t * (H * K) + i_kh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + t * (H * K) + i_kh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + t * (HV * V) + i_h * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_g = tl.load(g + t * (HV * K) + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_beta = tl.load(beta + t * HV + i_h).to(tl.float32)
    if L2NORM:
        b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 0) + L2NORM_EPS)
        b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 0) + L2NORM_EPS)
    if USE_GATE:
        if HAS_BIAS:
            b_g += tl.load(dt_bias + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        a_log = 0.0
        if HAS_A:
            a_log = tl.load(A_log + i_h).to(tl.float32)
        b_g = tl.where(m_k, gate_value(b_g, a_log, lower_bound, USE_LB, HAS_A), 0.0)
    if BETA_SIGMOID:
        b_beta = tl.sigmoid(b_beta) * BETA_SCALE
    b_s = b_s * tl.exp(b_g)[:, None]
    b_u = b_v - tl.sum(b_s * b_k[:, None], 0)                   # what k_t retrieves, replaced by v_t
    b_s = b_s + (b_beta * b_k)[:, None] * b_u[None, :]
    b_o = tl.sum(b_s * b_q[:, None], 0) * scale
    tl.store(o + t * (HV * V) + i_h * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_EACH:  # speculative decoding: the state after token t goes to slot idx[n, t - bos]
        slot = tl.load(idx + i_n * idx_cols + (t - bos)).to(tl.int64)
        if slot >= 0:  # a negative slot is padding: not written
            tl.store(pool + (slot * HV + i_h) * (K * V) + o_k[:, None] * s_k + o_v[None, :] * s_v, b_s,
                     mask=m_k[:, None] & m_v[None, :])
    return b_s


@triton.jit
def kda_decode_kernel(
    q, k, v, g, beta, o, A_log, dt_bias, h0, ht, idx, nat, cu, scale, lower_bound, s_k, s_v, idx_cols,
    # task config
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
    L2NORM: tl.constexpr, USE_GATE: tl.constexpr, USE_LB: tl.constexpr, HAS_A: tl.constexpr,
    HAS_BIAS: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_IDX: tl.constexpr, HAS_NAT: tl.constexpr, STORE_EACH: tl.constexpr,
    STORE_POOL: tl.constexpr, STORE_FINAL: tl.constexpr, INTERPRET: tl.constexpr,
    # kernel config
    BV: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // HV, i_nh % HV
    i_kh = i_h // (HV // H)
    bos, eos = tl.load(cu + i_n).to(tl.int64), tl.load(cu + i_n + 1).to(tl.int64)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * s_k + o_v[None, :] * s_v
    slot = i_n.to(tl.int64)
    if HAS_IDX:
        col = 0
        if HAS_NAT:
            col = tl.load(nat + i_n).to(tl.int64) - 1
        slot = tl.load(idx + i_n * idx_cols + col).to(tl.int64)
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    run_eos = eos
    if HAS_IDX:  # a negative slot is padding: the sequence is skipped (no pool access, zero output and state)
        run_eos = tl.where(slot >= 0, eos, bos)
        if slot >= 0:
            b_s += tl.load(h0 + (slot * HV + i_h) * (K * V) + p_kv, mask=m_kv, other=0.0).to(tl.float32)
        else:
            t = bos
            while t < eos:
                tl.store(o + t * (HV * V) + i_h * V + o_v, tl.zeros([BV], dtype=o.dtype.element_ty), mask=m_v)
                t += 1
    elif HAS_H0:
        b_s += tl.load(h0 + (slot * HV + i_h) * (K * V) + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    eos = run_eos
    if INTERPRET:  # the CPU interpreter cannot take a run-time range bound; a while loop computes the same
        t = bos
        while t < eos:
            b_s = _token_step(q, k, v, g, beta, o, A_log, dt_bias, h0, idx, b_s, t, bos, i_n, i_h, i_kh, o_k, m_k,
                              o_v, m_v, scale, lower_bound, s_k, s_v, idx_cols, H, HV, K, V, L2NORM, USE_GATE,
                              USE_LB, HAS_A, HAS_BIAS, BETA_SIGMOID, BETA_SCALE, STORE_EACH)
            t += 1
    else:
        for t in range(bos, eos):
            b_s = _token_step(q, k, v, g, beta, o, A_log, dt_bias, h0, idx, b_s, t, bos, i_n, i_h, i_kh, o_k, m_k,
                              o_v, m_v, scale, lower_bound, s_k, s_v, idx_cols, H, HV, K, V, L2NORM, USE_GATE,
                              USE_LB, HAS_A, HAS_BIAS, BETA_SIGMOID, BETA_SCALE, STORE_EACH)
    if STORE_POOL:  # in place, 1-D indices: the final state back to slot idx[n] (not for padding)
        if slot >= 0:
            tl.store(h0 + (slot * HV + i_h) * (K * V) + p_kv, b_s, mask=m_kv)
    if STORE_FINAL:
        tl.store(ht + (i_n * HV + i_h).to(tl.int64) * (K * V) + p_kv, b_s, mask=m_kv)


@functools.lru_cache(maxsize=64)
def _dense_offsets(B: int, T: int, device: str) -> torch.Tensor:
    """Offsets ``0, T, ..., B*T`` of B equal-length sequences (int32, on ``device``)."""
    return torch.arange(0, B + 1, dtype=torch.int32).mul_(T).to(device)


def fused_recurrent_kda_fwd(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts, *,
                            output_final_state: bool, ssm_state_indices=None, num_accepted_tokens=None,
                            inplace_final_state: bool = False, config: dict | None = None):
    """Token recurrence on user-layout tensors.  Returns ``(o [B, T, HV, V], final_state or None)``.

    With ``inplace_final_state`` the new state is written into ``initial_state`` (the pool when
    ``ssm_state_indices`` is given) and the returned state is None.  ``config``: a
    :class:`config.DecodeConfig` as a dict.
    """
    cfg = decode_config(config)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if cu_seqlens is None and q.is_cuda and torch.cuda.is_current_stream_capturing():
        cu = torch.arange(0, B + 1, device=q.device, dtype=torch.int32) * T  # no host copy inside a capture
    elif cu_seqlens is None:  # cached: no device work per call (decode steps are launch-bound)
        cu = _dense_offsets(B, T, str(q.device))
    else:
        cu = cu_seqlens.to(torch.int32)
    N = cu.shape[0] - 1
    q, k, v = (x.reshape(B * T, x.shape[2], x.shape[3]).contiguous() for x in (q, k, v))
    g = g.reshape(B * T, HV, K).contiguous()
    beta = beta.reshape(B * T, HV).contiguous()
    A_log, dt_bias = (x.contiguous() if x is not None else None for x in (A_log, dt_bias))
    o = torch.empty_like(v)
    has_idx = ssm_state_indices is not None
    store_each = inplace_final_state and has_idx and ssm_state_indices.dim() == 2
    store_pool = inplace_final_state and not store_each
    store_final = output_final_state and not inplace_final_state
    shape = (N, HV, V, K) if opts.state_v_first else (N, HV, K, V)
    ht = torch.empty(shape, device=q.device, dtype=torch.float32) if store_final else None
    s_k, s_v = (1, K) if opts.state_v_first else (V, 1)
    pool = initial_state
    if pool is not None and not pool.is_contiguous():
        if inplace_final_state:
            raise ValueError("inplace_final_state needs a contiguous initial_state")
        pool = pool.contiguous()
    idx = ssm_state_indices.contiguous() if has_idx else cu
    idx_cols = ssm_state_indices.shape[1] if has_idx and ssm_state_indices.dim() == 2 else 1
    use_gate = opts.use_gate_in_kernel
    BV = min(cfg.decode_BV, triton.next_power_of_2(V))
    if N:
        kda_decode_kernel[(triton.cdiv(V, BV), N * HV)](
            q, k, v, g, beta, o, A_log if A_log is not None else g, dt_bias if dt_bias is not None else g,
            pool if pool is not None else o, ht if ht is not None else o, idx,
            num_accepted_tokens if num_accepted_tokens is not None else cu, cu, float(opts.scale),
            float(opts.lower_bound) if opts.lower_bound is not None else 0.0, s_k, s_v, idx_cols,
            H=H, HV=HV, K=K, V=V, BK=triton.next_power_of_2(K), L2NORM=opts.use_qk_l2norm_in_kernel,
            USE_GATE=use_gate, USE_LB=use_gate and opts.lower_bound is not None,
            HAS_A=use_gate and A_log is not None, HAS_BIAS=use_gate and dt_bias is not None,
            BETA_SIGMOID=opts.use_beta_sigmoid_in_kernel, BETA_SCALE=2.0 if opts.allow_neg_eigval else 1.0,
            HAS_H0=pool is not None, HAS_IDX=has_idx, HAS_NAT=num_accepted_tokens is not None,
            STORE_EACH=store_each, STORE_POOL=store_pool, STORE_FINAL=store_final, INTERPRET=interpreting(),
            BV=BV, num_warps=cfg.decode_warps)
    o = o.view(B, T, HV, V)
    if store_pool and not has_idx and pool is not initial_state:
        initial_state.copy_(pool)
    return o, (None if inplace_final_state else ht)
