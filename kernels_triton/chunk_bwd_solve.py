"""Stage 2 of the Triton backward: through W = T ke, U = T v and the triangular inverse (docs/algorithm.md,
"The chunkwise backward", sections 2-3).

One program per (chunk, value head).  X = (I + A_kk)^-1 comes from the recompute's solve kernel or the training
forward (``[TT, HV, C]``, token-indexed), T = X diag(beta).  Then, one V block at a time (keS = ke h by a K loop, ke = k r_k exp(Gamma)):

    dv    = T^T dV_new = diag(beta) X^T dV_new   (the whole gradient of v)
    dT   += dV_new (v - ke h)^T                  (= dV_new v^T + dW ke^T with dW = -dV_new h^T)

then dbeta_j = sum_i dT[i,j] X[i,j] and Abar = -X^T (dT diag(beta)) X^T (strictly lower), and in a second walk
over V dAqk = dO V_new^T, P = scale dAqk (causal): the gradients of A_kk and of A_qk / scale that the intra stage
contracts.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gate import chunk_beta, chunk_bounds, interpreting, l2norm_factors, mm


def get_configs() -> list[dict]:
    """Search space of this stage (a product, searched knob by knob): K and V slices, warps."""
    return [{"bwd_solve_BK": bk, "bwd_solve_BV": bv, "bwd_solve_warps": w}
            for bk in (32, 64) for bv in (32, 64) for w in (4, 8)]


@triton.jit
def kda_bwd_solve_kernel(
    q, k, v, beta, do, v_new, dvn, h, x, gamma, dv, dv_out, d_akk, d_aqk, dbeta, chunk_seq, chunk_pos, cu, scale,
    s_gc, s_gh, s_gr,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr, SOLVE_PREC: tl.constexpr,
    DV_COPY: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_kh = i_h // (HV // H)
    t0, eos, _ = chunk_bounds(i_c, chunk_seq, chunk_pos, cu, C)
    o_c = tl.arange(0, C)
    o_t = t0 + o_c
    m_t = o_t < eos
    i_ch = i_c.to(tl.int64) * HV + i_h
    b_beta = chunk_beta(beta, o_t, m_t, i_h, HV, BETA_SIGMOID, BETA_SCALE)
    # X's rows are token-indexed; past the chunk's end they read as 0 (nothing there reaches a stored value)
    b_x = tl.load(x + o_t[:, None] * (HV * C) + i_h * C + o_c[None, :], mask=m_t[:, None], other=0.0)
    _, r_k = l2norm_factors(q, k, o_t, m_t, i_kh, H, K, C, BK, L2NORM)
    p_h = h + i_ch * (K * V)
    p_g = gamma + i_c.to(tl.int64) * s_gc + i_h * s_gh
    # first V walk: dv and dT (X, dT and one V block live); dA_qk waits for a second walk so that its C x C
    # accumulator and the dO / V_new blocks are not live next to them (registers, not HBM bytes: each input is
    # read once either way)
    b_dt = tl.zeros([C, C], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        p_v = o_t[:, None] * (HV * V) + i_h * V + o_v[None, :]
        b_dvn = tl.load(dvn + p_v, mask=m_tv, other=0.0)
        # dv = T^T dV_new = diag(beta) X^T dV_new: float32 for the intra stage, and in v's dtype for the caller
        b_dv = mm(tl.trans(b_x), b_dvn, INTERPRET, PREC) * b_beta[:, None]
        tl.store(dv + p_v, b_dv, mask=m_tv)
        if DV_COPY:
            tl.store(dv_out + p_v, b_dv.to(dv_out.dtype.element_ty), mask=m_tv)
        b_r = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)      # becomes v - ke h
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            m = m_t[:, None] & m_k[None, :]
            b_k = tl.load(k + o_t[:, None] * (H * K) + i_kh * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
            b_g = tl.load(p_g + o_c[:, None] * s_gr + o_k[None, :], mask=m, other=0.0)
            b_ke = tl.where(m, b_k * r_k[:, None] * tl.exp(b_g), 0.0)
            b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
            b_r -= mm(b_ke, b_h.to(tl.float32), INTERPRET, PREC)
        b_dt += mm(b_dvn, tl.trans(b_r), INTERPRET, PREC)
    valid = m_t[:, None] & m_t[None, :]
    p_a = o_t[:, None] * (HV * C) + i_h * C + o_c[None, :]
    tl.store(dbeta + o_t * HV + i_h, tl.sum(b_dt * b_x, 0), mask=m_t)
    b_xt = tl.trans(b_x)
    b_da = -mm(mm(b_xt, b_dt * b_beta[None, :], INTERPRET, SOLVE_PREC), b_xt, INTERPRET, SOLVE_PREC)
    tl.store(d_akk + p_a, tl.where((o_c[:, None] > o_c[None, :]) & valid, b_da, 0.0), mask=m_t[:, None])
    # second V walk: dA_qk = dO V_new^T
    b_dqk = tl.zeros([C, C], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_v = o_t[:, None] * (HV * V) + i_h * V + o_v[None, :]
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_vn = tl.load(v_new + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_dqk += mm(b_do, tl.trans(b_vn), INTERPRET, PREC)
    tl.store(d_aqk + p_a, tl.where((o_c[:, None] >= o_c[None, :]) & valid, b_dqk * scale, 0.0), mask=m_t[:, None])


def new_output(*shape, device, dtype=torch.float32) -> torch.Tensor:
    """An uninitialised output of the stage (float32 unless said): its kernel writes every element (every token lies
    in one chunk, and each program stores whole rows of its chunk), so no zero fill is paid for.  The CPU tests replace
    this with a NaN fill to prove that."""
    return torch.empty(*shape, device=device, dtype=dtype)


def chunk_bwd_solve(q, k, v, beta, do, fwd, dvn, opts, table, cfg):
    """Run the stage on flat tensors.  Returns ``(dv [TT, HV, V] float32, dv in v's dtype (the same tensor for a
    float32 v), d_akk, d_aqk [TT, HV, C], dbeta [TT, HV])``, float32 but the second: the gradient of v, of A_kk
    (strictly lower), of A_qk / scale (causal) and beta's part from T."""
    TT, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    C = table.chunk_size
    dev = q.device
    dv = new_output(TT, HV, V, device=dev)
    dv_out = dv if v.dtype == torch.float32 else new_output(TT, HV, V, device=dev, dtype=v.dtype)
    d_akk = new_output(TT, HV, C, device=dev)
    d_aqk = new_output(TT, HV, C, device=dev)
    dbeta = new_output(TT, HV, device=dev)
    x, gamma = fwd.x, fwd.gamma
    if tuple(x.shape) != (TT, HV, C) or not x.is_contiguous() or gamma.stride(3) != 1:
        raise ValueError("the recomputed inverse must be a contiguous [TT, HV, C] and Gamma have contiguous rows")
    if table.num_chunks:
        kda_bwd_solve_kernel[(table.num_chunks, HV)](
            q, k, v, beta, do, fwd.v_new, dvn, fwd.h, x, gamma, dv, dv_out, d_akk, d_aqk, dbeta,
            table.chunk_seq, table.chunk_pos, table.cu, float(opts.scale), *gamma.stride()[:3],
            H=H, HV=HV, K=K, V=V, C=C, L2NORM=opts.use_qk_l2norm_in_kernel,
            BETA_SIGMOID=opts.use_beta_sigmoid_in_kernel, BETA_SCALE=2.0 if opts.allow_neg_eigval else 1.0,
            BK=min(cfg.bwd_solve_BK, triton.next_power_of_2(K)),
            BV=min(cfg.bwd_solve_BV, triton.next_power_of_2(V)), INTERPRET=interpreting(),
            PREC=cfg.forward.precision, SOLVE_PREC=cfg.forward.solve_precision, DV_COPY=dv_out is not dv,
            num_warps=cfg.bwd_solve_warps)
    return dv, dv_out, d_akk, d_aqk, dbeta
