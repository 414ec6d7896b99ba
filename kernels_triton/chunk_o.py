"""Stage 3 of the Triton chunkwise forward, output (docs/algorithm.md).

One program per (V block, chunk, value head):

    O = scale (q * exp(Gamma)) h_c + A_qk V_new

with ``h_c`` the state entering the chunk (from chunk_state), and ``q * exp(Gamma)`` and ``A_qk`` (already
scaled and causal) from chunk_intra.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gate import chunk_bounds, interpreting, mm


def get_configs() -> list[dict]:
    """Search space of this stage: K/V-block widths, warps and pipelining depth."""
    return [{"o_BK": bk, "o_BV": bv, "o_warps": w} for bk in (64, 128) for bv in (64, 128) for w in (4, 8)]


O_STAGES = 2  # software pipelining of the K loop (measured on the H100, docs/triton.md)


@triton.jit
def kda_output_kernel(
    qg, h, aqk, v_new, o, chunk_seq, chunk_pos, cu, scale,
    # task config
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    # kernel config
    BK: tl.constexpr, BV: tl.constexpr, NUM_STAGES: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos, _ = chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C)
    o_c = tl.arange(0, C)
    o_t = t0 + o_c
    m_t = o_t < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_h = (i_c.to(tl.int64) * HV + i_h) * (K * V)
    b_o = tl.zeros([C, BV], dtype=tl.float32)
    for i_k in tl.range(0, tl.cdiv(K, BK), num_stages=NUM_STAGES):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        b_qg = tl.load(qg + o_t[:, None] * (HV * K) + i_h * K + o_k[None, :], mask=m, other=0.0)
        b_h = tl.load(h + p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_o += mm(b_qg.to(b_h.dtype), b_h, INTERPRET, PREC)
    b_o *= scale
    b_a = tl.load(aqk + o_t[:, None] * (HV * C) + i_h * C + o_c[None, :], mask=m_t[:, None], other=0.0)
    m_tv = m_t[:, None] & m_v[None, :]
    p_v = o_t[:, None] * (HV * V) + i_h * V + o_v[None, :]
    b_vn = tl.load(v_new + p_v, mask=m_tv, other=0.0)
    b_o += mm(b_a, b_vn.to(b_a.dtype), INTERPRET, PREC)
    tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_tv)


def chunk_o(qg, h, aqk, v_new, scale: float, table, cfg):
    """Output stage on flat tensors (``qg = q * exp(Gamma) [TT, HV, K]``; ``cfg`` a :class:`config.ChunkConfig`);
    returns ``o [TT, HV, V]`` in v_new's dtype."""
    TT, _, K = qg.shape
    HV, V = v_new.shape[1], v_new.shape[2]
    BK = min(cfg.o_BK, triton.next_power_of_2(K))
    BV = min(cfg.o_BV, triton.next_power_of_2(V))
    o = torch.empty_like(v_new)
    if table.num_chunks:
        kda_output_kernel[(triton.cdiv(V, BV), table.num_chunks, HV)](
            qg, h, aqk, v_new, o, table.chunk_seq, table.chunk_pos, table.cu, float(scale),
            HV=HV, K=K, V=V, C=table.chunk_size, BK=BK, BV=BV, NUM_STAGES=O_STAGES, INTERPRET=interpreting(),
            PREC=cfg.precision, num_warps=cfg.o_warps)
    return o
