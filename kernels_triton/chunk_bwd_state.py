"""Stage 1 of the Triton backward: the reverse state recurrence (docs/algorithm.md, "The chunkwise backward", section 1).

One program per (V block, sequence, value head) walks the chunks of its sequence from the last to the first,
keeping its ``[K, BV]`` slice of the float32 state gradient in registers (the V columns never mix):

    dhn_c  = dh                                         (gradient of the state leaving chunk c, stored)
    dV_new = A_qk^T dO + kg dh                          (stored: the solve and intra stages read it)
    dh     = diag(exp(Gamma_C)) dh + scale qg^T dO - W^T dV_new

It starts from the final-state cotangent (or zero) and ends with dh0.  ``state_v_first`` only swaps the strides
used for the final-state cotangent and dh0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_state import state_block_v
from .gate import interpreting, mm, state_tile, state_walk_program


def get_configs() -> list[dict]:
    """Search space of this stage (a product, searched knob by knob): V-block width, warps, pipelining depth."""
    return [{"bwd_state_BV": bv, "bwd_state_warps": w, "bwd_state_stages": s}
            for bv in (16, 32, 64) for w in (4, 8) for s in (2, 3)]


@triton.jit
def _reverse_step(qg, kg, w, aqk, gc, do, dhn, dvn, b_dh, bos, eos, first, j, i_h, scale, o_k, m_k, o_v, m_v,
                  HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, INTERPRET: tl.constexpr,
                  PREC: tl.constexpr):
    """Chunk ``j`` of the sequence: store dhn and dV_new, return the gradient of the state entering it."""
    o_c = tl.arange(0, C)
    o_t = bos + j * C + o_c
    m_t = o_t < eos
    i_c = (first + j).to(tl.int64)
    tl.store(dhn + (i_c * HV + i_h) * (K * V) + o_k[:, None] * V + o_v[None, :], b_dh.to(dhn.dtype.element_ty),
             mask=m_k[:, None] & m_v[None, :])
    p_k = o_t[:, None] * (HV * K) + i_h * K + o_k[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    p_v = o_t[:, None] * (HV * V) + i_h * V + o_v[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_do = tl.load(do + p_v, mask=m_tv, other=0.0)
    b_a = tl.load(aqk + o_t[:, None] * (HV * C) + i_h * C + o_c[None, :], mask=m_t[:, None], other=0.0)
    b_kg = tl.load(kg + p_k, mask=m_tk, other=0.0)
    b_dvn = mm(tl.trans(b_a), b_do.to(b_a.dtype), INTERPRET, PREC) + mm(b_kg, b_dh.to(b_kg.dtype), INTERPRET, PREC)
    b_dvn = b_dvn.to(dvn.dtype.element_ty)
    tl.store(dvn + p_v, b_dvn, mask=m_tv)
    b_qg = tl.load(qg + p_k, mask=m_tk, other=0.0)
    b_w = tl.load(w + p_k, mask=m_tk, other=0.0)
    b_gc = tl.load(gc + (i_c * HV + i_h) * K + o_k, mask=m_k, other=0.0)
    b_dh = b_dh * tl.exp(b_gc)[:, None] + scale * mm(tl.trans(b_qg), b_do.to(b_qg.dtype), INTERPRET, PREC)
    return b_dh - mm(tl.trans(b_w), b_dvn.to(b_w.dtype), INTERPRET, PREC)


@triton.jit
def kda_bwd_state_kernel(
    qg, kg, w, aqk, gc, do, dht, dh0, dhn, dvn, cu, seq_first, s_k, s_v, scale,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    i_n, i_h, bos, eos, first, o_k, m_k, o_v, m_v, m_kv, p_state = state_walk_program(cu, seq_first, s_k, s_v, HV, K,
                                                                                     V, BK, BV)
    b_dh = state_tile(dht, p_state, m_kv, BK, BV, HAS_DHT)
    n_chunks = tl.cdiv(eos - bos, C)
    if INTERPRET:  # the CPU interpreter cannot take a run-time range bound
        j = n_chunks - 1
        while j >= 0:
            b_dh = _reverse_step(qg, kg, w, aqk, gc, do, dhn, dvn, b_dh, bos, eos, first, j, i_h, scale, o_k, m_k,
                                 o_v, m_v, HV, K, V, C, INTERPRET, PREC)
            j -= 1
    else:
        for jj in tl.range(0, n_chunks, num_stages=NUM_STAGES):
            b_dh = _reverse_step(qg, kg, w, aqk, gc, do, dhn, dvn, b_dh, bos, eos, first, n_chunks - 1 - jj, i_h,
                                 scale, o_k, m_k, o_v, m_v, HV, K, V, C, INTERPRET, PREC)
    if STORE_DH0:
        tl.store(dh0 + p_state, b_dh, mask=m_kv)


def chunk_bwd_state(fwd, do, dht, has_h0: bool, scale: float, table, state_v_first: bool, cfg):
    """Run the reverse recurrence on flat tensors (``do [TT, HV, V]``, ``dht`` in the user's state layout or
    None).  Returns ``(dhn [chunks, HV, K, V] in k's dtype, dv_new [TT, HV, V] float32, dh0 float32 in the
    state layout or None)``."""
    TT, HV, K = fwd.qg.shape
    V = do.shape[2]
    N = table.num_seqs
    BV = min(cfg.bwd_state_BV or state_block_v(N, HV, V), triton.next_power_of_2(V))
    dhn = torch.empty(table.num_chunks, HV, K, V, device=do.device, dtype=fwd.kg.dtype)
    dvn = torch.empty(TT, HV, V, device=do.device, dtype=torch.float32)
    shape = (N, HV, V, K) if state_v_first else (N, HV, K, V)
    dh0 = torch.empty(shape, device=do.device, dtype=torch.float32) if has_h0 else None
    s_k, s_v = (1, K) if state_v_first else (V, 1)
    if N:
        kda_bwd_state_kernel[(triton.cdiv(V, BV), N * HV)](
            fwd.qg, fwd.kg, fwd.w, fwd.aqk, fwd.gc, do, dht.contiguous() if dht is not None else do,
            dh0 if dh0 is not None else dvn, dhn, dvn, table.cu, table.seq_first, s_k, s_v, float(scale),
            HV=HV, K=K, V=V, C=table.chunk_size, BK=triton.next_power_of_2(K), HAS_DHT=dht is not None,
            STORE_DH0=dh0 is not None, INTERPRET=interpreting(), PREC=cfg.forward.precision,
            BV=BV, NUM_STAGES=cfg.bwd_state_stages, num_warps=cfg.bwd_state_warps)
    return dhn, dvn, dh0
