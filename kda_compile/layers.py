"""Building blocks of the hybrid decoder (:mod:`kda_compile.model`): norms, SwiGLU MLP, the KDA layer and the
MLA layer.

Every layer is *functional* about its cache: it takes the cached tensors of the tokens before the current ones
(or None) and returns new tensors, never writing into what it was given.  That keeps ``torch.compile`` graphs
free of mutation and lets the ONNX exporter treat the cache as plain inputs and outputs.

Architecture after Kimi Linear (Kimi Team, "Kimi Linear: An Expressive, Efficient Attention Architecture",
arXiv:2510.26692): KDA layers with a short causal convolution on q/k/v, a low-rank gate projection into
``-exp(A_log) * softplus(x + dt_bias)``, sigmoid beta and a gated RMSNorm on the output; and multi-head latent
attention (MLA, DeepSeek-V2, arXiv:2405.04434) without rotary embedding, whose cache is one compressed latent
vector per token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import api as kda_api


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types, else the dtype itself (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dimension, computed in at least float32 (written out, not
    ``F.rms_norm``, so that every exporter and compiler sees the same plain ops)."""
    xf = x.to(_acc(x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(xf.dtype)).to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(RMSNorm):
    """``rms_norm(x) * weight * sigmoid(gate)`` per head (the KDA output norm; the gate comes from a low-rank
    projection of the layer input)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        f = _acc(x.dtype)
        return (rms_norm(x.to(f), self.weight, self.eps) * torch.sigmoid(gate.to(f))).to(x.dtype)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer, "GLU Variants Improve Transformer", arXiv:2002.05202)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor | None):
    """Short causal depthwise convolution over time, continuing from ``conv_state``.

    ``x [B, T, C]``, ``weight [C, W]``, ``conv_state [B, C, W - 1]`` (the last W - 1 inputs before x, zeros
    at the start of a sequence, or None for zeros).  Returns ``(y [B, T, C], new_conv_state [B, C, W - 1])``;
    prefill in pieces equals prefill at once because the state carries exactly the inputs the next output
    window needs.
    """
    B, T, C = x.shape
    W = weight.shape[-1]
    xt = x.transpose(1, 2)                                              # [B, C, T]
    if conv_state is None:
        conv_state = xt.new_zeros(B, C, W - 1)
    window = torch.cat([conv_state.to(xt.dtype), xt], dim=-1)          # [B, C, W - 1 + T]
    if T == 1:  # decode: one dot product per channel, no convolution launch
        y = (window * weight.to(xt.dtype)).sum(-1, keepdim=True)
    else:
        y = F.conv1d(window, weight.to(xt.dtype).unsqueeze(1), groups=C)
    return y.transpose(1, 2), window[:, :, window.shape[-1] - (W - 1):]


class KDALayer(nn.Module):
    """Kimi Delta Attention token mixer.

    q/k/v projections -> short causal conv + SiLU -> KDA (q/k L2 norm, gate ``-exp(A_log) * softplus(f +
    dt_bias)`` and ``beta = sigmoid(b)`` all applied inside the op, as its fused prologues) -> gated RMSNorm
    with a low-rank sigmoid output gate -> output projection.  ``f`` comes from a low-rank projection
    (hidden -> gate_rank -> HV * K).  ``config.kda_output_gate_bias`` gives the output gate's second projection a
    bias (Kimi Linear's has none); ``config.kda_lower_bound`` switches to the bounded gate of later models.
    Prefill (T > 1) runs :func:`kda_compile.chunk_kda`, a decode step
    (T == 1) :func:`kda_compile.fused_recurrent_kda`; the dispatch picks the kernels.
    """

    def __init__(self, config):
        super().__init__()
        c = config
        self.H, self.HV, self.K, self.V = c.num_heads, c.kda_num_v_heads, c.head_dim, c.v_head_dim
        self.conv_size, self.chunk_size, self.backend = c.conv_size, c.chunk_size, c.kda_backend
        self.lower_bound = c.kda_lower_bound
        hidden, rank = c.hidden_size, c.kda_gate_rank
        self.q_proj = nn.Linear(hidden, self.H * self.K, bias=False)
        self.k_proj = nn.Linear(hidden, self.H * self.K, bias=False)
        self.v_proj = nn.Linear(hidden, self.HV * self.V, bias=False)
        # One depthwise filter per channel of the concatenated [q | k | v] (one conv state per layer).
        self.conv_weight = nn.Parameter(torch.empty(self.conv_channels, c.conv_size))
        self.f_proj = nn.Sequential(nn.Linear(hidden, rank, bias=False), nn.Linear(rank, self.HV * self.K, bias=False))
        self.b_proj = nn.Linear(hidden, self.HV, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.HV))
        self.dt_bias = nn.Parameter(torch.empty(self.HV * self.K))
        self.g_proj = nn.Sequential(nn.Linear(hidden, rank, bias=False), nn.Linear(rank, self.HV * self.V,
                                                                               bias=c.kda_output_gate_bias))
        self.o_norm = GatedRMSNorm(self.V, eps=c.rms_norm_eps)
        self.o_proj = nn.Linear(self.HV * self.V, hidden, bias=False)

    @property
    def conv_channels(self) -> int:
        return 2 * self.H * self.K + self.HV * self.V

    def _apply(self, fn, recurse=True):
        # A_log and dt_bias stay float32 when the model is cast to a half type (as Kimi Linear keeps them).
        super()._apply(fn, recurse)
        for p in (self.A_log, self.dt_bias):
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        return self

    @torch.no_grad()
    def reset_kda_parameters(self) -> None:
        """Kimi/Mamba-style init: ``A = exp(A_log)`` uniform in [1, 16], ``softplus(dt_bias)`` log-uniform in
        [1e-3, 1e-1] (so the initial decay per token spans slow and fast forgetting)."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))          # inverse softplus
        nn.init.uniform_(self.conv_weight, -1 / math.sqrt(self.conv_size), 1 / math.sqrt(self.conv_size))

    def forward(self, x: torch.Tensor, conv_state: torch.Tensor | None = None,
                recurrent_state: torch.Tensor | None = None, want_state: bool = True, cp_context=None):
        """``x [B, T, hidden]`` -> ``(y [B, T, hidden], new conv_state, new recurrent_state or None)``.

        With ``cp_context`` (a :class:`~kda_compile.cp_context.KDAContext`), ``x [1, T_local, hidden]`` is this
        rank's share of a sequence (or pack) split over the context's ranks: the short convolution reads the
        tokens before every piece from the ranks that hold them (:func:`kda_compile.cp_conv.conv_runs`) and KDA runs
        context parallel (``chunk_kda(..., cp_context=...)``).  No states go in or come out (returns
        ``(y, None, None)``); every rank of the group must call it."""
        B, T, _ = x.shape
        H, HV, K, V = self.H, self.HV, self.K, self.V
        if cp_context is not None and (conv_state is not None or recurrent_state is not None):
            raise ValueError("KDALayer: conv_state and recurrent_state must be None with cp_context "
                             "(the context-parallel forward starts every sequence from zero)")
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        if cp_context is None:
            qkv, new_conv_state = causal_depthwise_conv(qkv, self.conv_weight, conv_state)
        else:
            from .cp_conv import conv_runs
            runs = conv_runs(qkv, cp_context, self.conv_size)
            qkv = torch.cat([causal_depthwise_conv(run, self.conv_weight, state)[0] for run, state in runs], 1)
            new_conv_state, want_state = None, False
        q, k, v = F.silu(qkv).split([H * K, H * K, HV * V], dim=-1)
        q, k, v = q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, HV, V)
        g = self.f_proj(x).reshape(B, T, HV, K)                         # raw gate, activated in the op
        beta = self.b_proj(x)                                           # logits, sigmoid in the op
        # A_log / dt_bias reach the op in >= float32 (as Kimi Linear keeps them) even in a bf16 model.
        flags = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                     A_log=self.A_log.to(_acc(x.dtype)), dt_bias=self.dt_bias.to(_acc(x.dtype)),
                     lower_bound=self.lower_bound, initial_state=recurrent_state,
                     output_final_state=want_state, backend=self.backend)
        if cp_context is not None:
            o, new_state = kda_api.chunk_kda(q, k, v, g, beta, chunk_size=self.chunk_size, cp_context=cp_context,
                                             **flags)
        elif T == 1:
            o, new_state = kda_api.fused_recurrent_kda(q, k, v, g, beta, **flags)
        else:
            o, new_state = kda_api.chunk_kda(q, k, v, g, beta, chunk_size=self.chunk_size, **flags)
        gate = self.g_proj(x).reshape(B, T, HV, V)
        o = self.o_norm(o, gate).reshape(B, T, HV * V)
        return self.o_proj(o), new_conv_state, new_state


class MLALayer(nn.Module):
    """Multi-head latent attention without rotary embedding (Kimi Linear's global layers are NoPE).

    Each token is compressed to one latent ``c = rms_norm(kv_a(x)[:rank]) [kv_lora_rank]``; keys and values of
    every head are ``kv_b(c)``.  With ``config.mla_rope_head_dim = R > 0`` (Kimi Linear: ``qk_rope_head_dim``),
    ``kv_a`` also emits an R-wide key part ``k_r = kv_a(x)[rank:]`` that is shared by all heads and, under NoPE,
    left un-rotated and un-normalised; each head's query then has ``dk + R`` dims, its key is ``[k_nope_h | k_r]``
    and the scale is ``(dk + R) ** -0.5``.  The cache holds ``[c | k_r]`` per token: ``[B, L, rank + R]``.

    Prefill expands the latents and runs scaled-dot-product attention; a decode step (one query) uses the
    absorbed form (DeepSeek-V2, arXiv:2405.04434, section 2.1.2): ``q_h . (W_uk_h c) = (W_uk_h^T q_h) . c`` and
    ``W_uv_h (sum p c)``, so it reads each cached latent once instead of expanding L latents for H heads.  Both
    forms are the same math.
    """

    def __init__(self, config):
        super().__init__()
        c = config
        self.H, self.dk, self.dv, self.rank = c.mla_heads, c.mla_qk_head_dim, c.mla_v_head_dim, c.kv_lora_rank
        self.dr = c.mla_rope_head_dim
        self.scale = (self.dk + self.dr) ** -0.5
        hidden, eps = c.hidden_size, c.mla_norm_eps
        q_dim = self.H * (self.dk + self.dr)
        if c.q_lora_rank:
            self.q_proj = nn.Sequential(nn.Linear(hidden, c.q_lora_rank, bias=False), RMSNorm(c.q_lora_rank, eps),
                                        nn.Linear(c.q_lora_rank, q_dim, bias=False))
        else:
            self.q_proj = nn.Linear(hidden, q_dim, bias=False)
        self.kv_a_proj = nn.Linear(hidden, self.rank + self.dr, bias=False)
        self.kv_a_norm = RMSNorm(self.rank, eps)
        self.kv_b_proj = nn.Linear(self.rank, self.H * (self.dk + self.dv), bias=False)
        self.o_proj = nn.Linear(self.H * self.dv, hidden, bias=False)

    def forward(self, x: torch.Tensor, latent_prefix: torch.Tensor | None = None, cp_context=None):
        """``x [B, T, hidden]``, ``latent_prefix [B, P, rank + R]`` (P cached tokens, may be 0, or None) ->
        ``(y [B, T, hidden], latents [B, P + T, rank + R])``.  Query i sits at position P + i (causal offset).

        With ``cp_context`` (a :class:`~kda_compile.cp_context.KDAContext`), ``x [1, T_local, hidden]`` is this
        rank's share of a sequence (or pack) split over the context's ranks; the queries attend to the
        latents of every rank, gathered at the tokens' global positions (:mod:`kda_compile.cp_attention`, which
        says why this is not PyTorch's ring attention).  Returns this rank's
        latents ``[1, T_local, rank + R]``; every rank of the group must call it."""
        B, T, _ = x.shape
        if cp_context is not None and latent_prefix is not None:
            raise ValueError("MLALayer: latent_prefix must be None with cp_context (no cache in the "
                             "context-parallel forward)")
        kv = self.kv_a_proj(x)
        latent = self.kv_a_norm(kv[..., :self.rank])
        if self.dr:
            latent = torch.cat([latent, kv[..., self.rank:].to(latent.dtype)], dim=-1)
        if latent_prefix is not None:
            latent = torch.cat([latent_prefix.to(latent.dtype), latent], dim=1)
        q = self.q_proj(x).reshape(B, T, self.H, self.dk + self.dr)
        if cp_context is not None:
            from .cp_attention import gather_visible_latents
            keys, keep = gather_visible_latents(latent, cp_context)
            o = self._attend_expanded(q, keys, keep)
        elif T == 1:
            o = self._attend_absorbed(q[:, 0], latent).unsqueeze(1)
        else:
            o = self._attend_expanded(q, latent)
        return self.o_proj(o.reshape(B, T, self.H * self.dv)), latent

    def _attend_expanded(self, q: torch.Tensor, latent: torch.Tensor, keep: torch.Tensor | None = None):
        """Queries ``[B, T, H, dk + R]`` against the expanded latents ``[B, L, rank + R]`` -> ``[B, T, H, dv]``;
        ``keep [T, L]`` (bool) says which keys each query sees, None: the last T of the L are the queries'
        own tokens (causal after a cached prefix)."""
        B, T, H, _ = q.shape
        L = latent.shape[1]
        kv = self.kv_b_proj(latent[..., :self.rank]).reshape(B, L, H, self.dk + self.dv)
        k, v = kv.split([self.dk, self.dv], dim=-1)
        if self.dr:  # the shared key part, the same for every head
            k = torch.cat([k, latent[..., self.rank:].unsqueeze(2).expand(B, L, H, self.dr).to(k.dtype)], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if keep is None and L == T:  # no cached prefix: plain causal attention (lets SDPA pick its fused kernels)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            if keep is None:        # cached prefix of P = L - T tokens: query i sees keys j <= P + i
                keep = torch.arange(L, device=q.device)[None, :] <= torch.arange(T, device=q.device)[:, None] + (L - T)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=self.scale)
        return o.transpose(1, 2)                                        # [B, T, H, dv]

    def _attend_absorbed(self, q: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """One query per sequence ``q [B, H, dk + R]`` against all latents ``[B, L, rank + R]`` -> ``[B, H, dv]``."""
        w = self.kv_b_proj.weight.reshape(self.H, self.dk + self.dv, self.rank)
        w_uk, w_uv = w[:, :self.dk], w[:, self.dk:]                     # [H, dk, rank], [H, dv, rank]
        f = _acc(q.dtype)
        lat = latent[..., :self.rank].to(f)
        q_latent = (q[..., :self.dk].to(f).unsqueeze(-2) @ w_uk.to(f)).squeeze(-2)    # [B, H, rank]
        scores = q_latent @ lat.transpose(1, 2)                                        # [B, H, L]
        if self.dr:  # q_r . k_r, the shared key part
            scores = scores + q[..., self.dk:].to(f) @ latent[..., self.rank:].to(f).transpose(1, 2)
        o_latent = torch.softmax(scores * self.scale, dim=-1) @ lat                   # [B, H, rank]
        return (o_latent.unsqueeze(-2) @ w_uv.to(f).transpose(1, 2)).squeeze(-2).to(q.dtype)
