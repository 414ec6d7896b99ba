"""Stage 2 of the Triton chunkwise forward, state: the inter-chunk state recurrence (docs/algorithm.md).

One program per (V block, sequence, value head) walks the chunks of its sequence in order, keeping its
``[K, BV]`` slice of the float32 state in registers:

    h_c    = S                                   (state entering chunk c, stored for the output stage)
    V_new  = U - W S
    S      = diag(exp(gc)) S + kg^T V_new         (kg = k * exp(gc - Gamma), gc from chunk_intra)

The products use the dtype of W/kg (bf16 inputs: bf16 tensor-core products with float32 accumulation; the
state itself stays float32; float32 inputs: the config's ``precision``).  ``state_v_first`` only swaps the
strides used to read/write h0 and the final state.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gate import interpreting, mm, state_tile, state_walk_program


def get_configs() -> list[dict]:
    """Search space of this stage: V-block width, warps and pipelining depth."""
    return [{"state_BV": bv, "state_warps": w, "state_stages": s}
            for bv in (16, 32, 64) for w in (4, 8) for s in (2, 3)]


def state_block_v(num_seqs: int, HV: int, V: int) -> int:
    """Default V-block width: the widest (<= 64) that still gives >= 128 programs (V blocks x sequences x
    heads), since the recurrence over chunks is sequential inside a program."""
    bv = 64
    while bv > 16 and num_seqs * HV * -(-V // bv) < 128:
        bv //= 2
    return bv


@triton.jit
def _chunk_step(kg, w, u, gc, h, v_new, b_s, bos, eos, first, j, i_h, o_k, m_k, o_v, m_v,
                HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, INTERPRET: tl.constexpr,
                PREC: tl.constexpr):
    """One chunk: store the entering state, write V_new, return the state leaving the chunk."""
    o_t = bos + j * C + tl.arange(0, C)
    m_t = o_t < eos
    tl.store(h + ((first + j) * HV + i_h) * (K * V) + o_k[:, None] * V + o_v[None, :],
             b_s.to(h.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])
    p_k = o_t[:, None] * (HV * K) + i_h * K + o_k[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    b_w = tl.load(w + p_k, mask=m_tk, other=0.0)
    p_v = o_t[:, None] * (HV * V) + i_h * V + o_v[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_u = tl.load(u + p_v, mask=m_tv, other=0.0).to(tl.float32)
    b_vn = (b_u - mm(b_w, b_s.to(b_w.dtype), INTERPRET, PREC)).to(v_new.dtype.element_ty)
    tl.store(v_new + p_v, b_vn, mask=m_tv)
    b_kg = tl.load(kg + p_k, mask=m_tk, other=0.0)
    b_gc = tl.load(gc + ((first + j) * HV + i_h) * K + o_k, mask=m_k, other=0.0)
    return b_s * tl.exp(b_gc)[:, None] + mm(tl.trans(b_kg), b_vn.to(b_kg.dtype), INTERPRET, PREC)


@triton.jit
def kda_state_kernel(
    kg, w, u, gc, h0, h, v_new, ht, cu, seq_first, s_k, s_v,
    # task config
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
    # kernel config
    BV: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    i_n, i_h, bos, eos, first, o_k, m_k, o_v, m_v, m_kv, p_state = state_walk_program(cu, seq_first, s_k, s_v, HV, K,
                                                                                     V, BK, BV)
    b_s = state_tile(h0, p_state, m_kv, BK, BV, HAS_H0)
    n_chunks = tl.cdiv(eos - bos, C)
    if INTERPRET:  # the CPU interpreter cannot take a run-time range bound; a while loop computes the same
        j = 0
        while j < n_chunks:
            b_s = _chunk_step(kg, w, u, gc, h, v_new, b_s, bos, eos, first, j, i_h, o_k, m_k, o_v, m_v, HV, K, V, C,
                               INTERPRET, PREC)
            j += 1
    else:
        for j in tl.range(0, n_chunks, num_stages=NUM_STAGES):
            b_s = _chunk_step(kg, w, u, gc, h, v_new, b_s, bos, eos, first, j, i_h, o_k, m_k, o_v, m_v, HV, K, V, C,
                               INTERPRET, PREC)
    if STORE_FINAL:
        tl.store(ht + p_state, b_s.to(ht.dtype.element_ty), mask=m_kv)


def chunk_state(kg, w, u, gc, initial_state, table, state_v_first: bool, output_final_state: bool, cfg):
    """Run the state recurrence (``cfg`` a :class:`config.ChunkConfig`).  Returns ``(h [total chunks, HV, K, V]
    in kg's dtype, v_new [TT, HV, V] in u's dtype, final state (float32, user layout) or None)``."""
    TT, HV, K = kg.shape
    V = u.shape[2]
    N = table.num_seqs
    BV = min(cfg.state_BV or state_block_v(N, HV, V), triton.next_power_of_2(V))
    h = torch.empty(table.num_chunks, HV, K, V, device=kg.device, dtype=kg.dtype)
    v_new = torch.empty_like(u)
    shape = (N, HV, V, K) if state_v_first else (N, HV, K, V)
    ht = torch.empty(shape, device=kg.device, dtype=torch.float32) if output_final_state else None
    s_k, s_v = (1, K) if state_v_first else (V, 1)
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    if N:
        kda_state_kernel[(triton.cdiv(V, BV), N * HV)](
            kg, w, u, gc, initial_state if initial_state is not None else kg, h, v_new,
            ht if ht is not None else kg, table.cu, table.seq_first, s_k, s_v,
            HV=HV, K=K, V=V, C=table.chunk_size, BK=triton.next_power_of_2(K),
            HAS_H0=initial_state is not None, STORE_FINAL=ht is not None, INTERPRET=interpreting(),
            PREC=cfg.precision, BV=BV, NUM_STAGES=cfg.state_stages, num_warps=cfg.state_warps)
    return h, v_new, ht
