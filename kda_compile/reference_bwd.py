"""PyTorch reference of the chunkwise KDA backward (docs/algorithm.md, "The chunkwise backward"), explicit formulas, no autograd.

:func:`kda_chunkwise_bwd` is the backward of :func:`kda_compile.reference.kda_chunkwise` on prepared inputs
(prologues applied, q/k repeated to the value heads, padded ``[N, Tp, HV, ...]``): it recomputes the state
entering every chunk, then walks the chunks in reverse, vectorised over sequences and heads.
:func:`kda_reference_bwd` runs the whole backward on user-layout tensors, prologues and grouped value heads
included, and returns the gradient of every input.  Float64 in, float64 out: the oracle the kernels are
compared with (itself checked against autograd through :func:`kda_compile.reference.kda_reference`).
"""
from __future__ import annotations

import torch

from .reference import (L2NORM_EPS, KDAOptions, Prepared, compute_dtype, from_padded, kda_chunkwise, kda_gate,
                        prepare, to_padded)


def _chunk_step_bwd(q, k, v, g, beta, S, dO, dS_next, scale):
    """Backward of one chunk for all sequences and heads (shapes as ``reference._chunk_step``).

    Returns ``(dq, dk, dv, dg, dbeta, dS)`` with ``dS`` the gradient of the state entering the chunk.
    """
    C = q.shape[2]
    G = g.cumsum(2)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = causal.tril(-1)
    # E_rs = exp(Gamma_r - Gamma_s) for s <= r only (every exponent <= 0)
    diff = (G.unsqueeze(3) - G.unsqueeze(2)).masked_fill(~causal[:, :, None], float("-inf"))
    E = diff.exp()                                                     # [N, HV, C(r), C(s), K]
    A0 = torch.einsum("nhrc,nhrsc,nhsc->nhrs", k, E, k) * strict
    Q0 = torch.einsum("nhrc,nhrsc,nhsc->nhrs", q, E, k)                # causal through E
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    X = torch.linalg.solve_triangular(eye + beta.unsqueeze(-1) * A0, eye.expand_as(A0), upper=False,
                                      unitriangular=True)
    T = X * beta.unsqueeze(-2)                                         # X diag(beta)
    eG = G.exp()
    gc = G[:, :, -1:]                                                  # Gamma_C (pad rows carry g = 0)
    ke, qg, kg = k * eG, q * eG, k * (gc - G).exp()
    W = T @ ke
    V_new = T @ v - W @ S
    Xt = X.transpose(-1, -2)

    # reverse state recurrence and the inter-chunk products
    dV_new = (scale * Q0).transpose(-1, -2) @ dO + kg @ dS_next
    dS = gc.transpose(-1, -2).exp() * dS_next + scale * qg.transpose(-1, -2) @ dO - W.transpose(-1, -2) @ dV_new
    d_qg = scale * dO @ S.transpose(-1, -2)
    d_kg = V_new @ dS_next.transpose(-1, -2)
    dW = -dV_new @ S.transpose(-1, -2)
    d_gc = gc.squeeze(2).exp() * (S * dS_next).sum(-1)                 # [N, HV, K]
    P = scale * (dO @ V_new.transpose(-1, -2)) * causal                # gradient of Q0

    # through W = T ke, U = T v and the inverse
    dT = dV_new @ v.transpose(-1, -2) + dW @ ke.transpose(-1, -2)
    dv = T.transpose(-1, -2) @ dV_new
    d_ke = T.transpose(-1, -2) @ dW
    dbeta = (dT * X).sum(-2)                                           # beta as T's column factor
    Abar = -(Xt @ (dT * beta.unsqueeze(-2)) @ Xt) * strict             # gradient of A_kk
    R = beta.unsqueeze(-1) * Abar                                      # gradient of A0

    # intra-chunk products: row side (Gq, Gk) and column side (Hc)
    Gq = torch.einsum("nhrs,nhrsc,nhsc->nhrc", P, E, k)
    Gk = torch.einsum("nhrs,nhrsc,nhsc->nhrc", Abar, E, k)
    Hc = torch.einsum("nhrs,nhrsc,nhrc->nhsc", P, E, q) + torch.einsum("nhrs,nhrsc,nhrc->nhsc", R, E, k)
    b = beta.unsqueeze(-1)
    dq = Gq + d_qg * eG
    dk = b * Gk + Hc + d_ke * eG + d_kg * (gc - G).exp()
    dbeta = dbeta + (k * Gk).sum(-1)
    dG = q * Gq + b * k * Gk - k * Hc + d_qg * qg + d_ke * ke - d_kg * kg
    d_gc = d_gc + (d_kg * kg).sum(2)
    dG[:, :, -1] += d_gc
    dg = dG.flip(2).cumsum(2).flip(2)                                  # reverse cumulative sum in the chunk
    return dq, dk, dv, dg, dbeta, dS


def kda_chunkwise_bwd(p: Prepared, scale: float, chunk_size: int, do: torch.Tensor, d_final: torch.Tensor | None):
    """Backward of :func:`kda_compile.reference.kda_chunkwise` (``p`` padded to a multiple of ``chunk_size``).

    ``do [N, Tp, HV, V]``, ``d_final [N, HV, K, V]`` (cotangent of the final state, or None).  Returns the
    gradients of the prepared inputs ``(dq, dk, dv, dg, dbeta)`` (padded layout) and of the initial state.
    """
    N, Tp, HV, _ = p.q.shape
    _, _, states = kda_chunkwise(p, scale, chunk_size, keep_chunk_states=True)
    q, k, v, g, dO = (x.transpose(1, 2) for x in (p.q, p.k, p.v, p.g, do))
    beta = p.beta.transpose(1, 2)
    dS = torch.zeros_like(p.state) if d_final is None else d_final.to(p.state.dtype)
    grads = [torch.zeros_like(x) for x in (q, k, v, g)] + [torch.zeros_like(beta)]
    for i, start in reversed(list(enumerate(range(0, Tp, chunk_size)))):
        sl = slice(start, start + chunk_size)
        *step, dS = _chunk_step_bwd(q[:, :, sl], k[:, :, sl], v[:, :, sl], g[:, :, sl], beta[:, :, sl],
                                    states[:, i], dO[:, :, sl], dS, scale)
        for acc, d in zip(grads, step):
            acc[:, :, sl] = d
    return tuple(x.transpose(1, 2) for x in grads) + (dS,)


# ------------------------------------------------------------------------------------ prologue gradients

def l2_normalize_bwd(x: torch.Tensor, dy: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """Gradient of ``x / sqrt(sum(x**2) + eps)``: ``r (dy - y (y . dy))``."""
    r = torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)
    y = x * r
    return r * (dy - y * (y * dy).sum(-1, keepdim=True))


def kda_gate_bwd(g, A_log, dt_bias, lower_bound, d_gate):
    """Gradients ``(dg, dA_log, ddt_bias)`` of :func:`kda_compile.reference.kda_gate` (None where absent)."""
    HV, K = g.shape[-2:]
    x = g if dt_bias is None else g + dt_bias.to(g.dtype).view(HV, K)
    dA_log = None
    if lower_bound is not None:
        a = A_log.to(g.dtype).view(HV, 1).exp() if A_log is not None else None
        y = x if a is None else a * x
        s = torch.sigmoid(y)
        dy = d_gate * lower_bound * s * (1 - s)
        dx = dy if a is None else dy * a
        if A_log is not None:
            dA_log = (dy * y).flatten(0, -3).sum((0, 2))
    else:
        a = A_log.to(g.dtype).view(HV, 1).exp()
        slope = torch.where(x > 20.0, torch.ones_like(x), torch.sigmoid(x))  # softplus is linear above 20
        dx = -d_gate * a * slope
        dA_log = (d_gate * kda_gate(g, A_log, dt_bias, None)).flatten(0, -3).sum((0, 2))
    ddt = dx.flatten(0, -3).sum(0).reshape(HV * K) if dt_bias is not None else None
    return dx, dA_log, ddt


def beta_activation_bwd(beta: torch.Tensor, dbeta: torch.Tensor, opts: KDAOptions) -> torch.Tensor:
    """Gradient of :func:`kda_compile.reference.beta_activation` with respect to the beta given."""
    if not opts.use_beta_sigmoid_in_kernel:
        return dbeta
    s = torch.sigmoid(beta)
    return dbeta * s * (1 - s) * (2.0 if opts.allow_neg_eigval else 1.0)


# ------------------------------------------------------------------------------------------ entry point

def kda_reference_bwd(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts: KDAOptions, do, dht=None):
    """Backward of :func:`kda_compile.reference.kda_reference` (chunk form) on user-layout tensors.

    ``do`` is the gradient of ``o`` (v's shape), ``dht`` of the final state (the user's state layout) or None.
    Returns ``(dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias)``, each in its input's dtype, None for an input
    that is None (``A_log``/``dt_bias`` also when the gate is not computed in the kernel).
    """
    B, T, H, K = q.shape
    HV = v.shape[2]
    dtype = compute_dtype(q.dtype)
    p = prepare(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts, pad_to=opts.chunk_size)
    d_out = to_padded(do.to(dtype), p.bounds, p.q.shape[1])
    d_final = None
    if dht is not None:
        d_final = dht.to(dtype)
        d_final = d_final.transpose(-1, -2) if opts.state_v_first else d_final
    dq, dk, dv, dg, dbeta, dS0 = kda_chunkwise_bwd(p, opts.scale, opts.chunk_size, d_out, d_final)
    dq, dk, dv, dg = (from_padded(x, p.bounds, (B, T)) for x in (dq, dk, dv, dg))
    dbeta = from_padded(dbeta, p.bounds, (B, T))
    if HV != H:  # grouped value heads: sum each key head's group
        dq, dk = (x.view(B, T, H, HV // H, K).sum(3) for x in (dq, dk))
    if opts.use_qk_l2norm_in_kernel:
        dq = l2_normalize_bwd(q.to(dtype), dq)
        dk = l2_normalize_bwd(k.to(dtype), dk)
    dA_log = ddt = None
    if opts.use_gate_in_kernel:
        dg, dA_log, ddt = kda_gate_bwd(g.to(dtype), A_log, dt_bias, opts.lower_bound, dg)
    dbeta = beta_activation_bwd(beta.to(dtype), dbeta, opts)
    dh0 = None
    if initial_state is not None:
        dh0 = (dS0.transpose(-1, -2) if opts.state_v_first else dS0).to(initial_state.dtype).contiguous()

    def like(d, x):
        return None if d is None or x is None else d.to(x.dtype)

    return (like(dq, q), like(dk, k), like(dv, v), like(dg, g), like(dbeta, beta), dh0, like(dA_log, A_log),
            like(ddt, dt_bias))
