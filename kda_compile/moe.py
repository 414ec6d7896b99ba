"""Mixture-of-experts feed-forward block of Kimi Linear: a sigmoid (or softmax) router with a score-correction
bias and grouped top-k, routed SwiGLU experts and always-on shared experts.

Routing (DeepSeek-V3, arXiv:2412.19437, section 2.1.2, as Kimi Linear uses it), per token:

* ``s = sigmoid(x W_r^T)`` computed in float32 (float64 for a float64 model; softmax with
  ``moe_router_activation_func="softmax"``);
* the *choice* scores ``s + b`` (``b`` = ``e_score_correction_bias``) pick the experts, the plain ``s`` weight
  them: with grouped top-k the E experts form ``num_expert_group`` groups, a group's score is the sum of its
  two best choice scores, only the ``topk_group`` best groups stay eligible, then the ``top_k`` best eligible
  experts are chosen;
* weights ``w = s[chosen]``, divided by their sum when ``renormalize`` (plus 1e-20), times
  ``routed_scaling_factor``.

Ties: ``torch.topk`` decides which of exactly equal scores wins (transformers uses ``sorted=False`` too); with
continuous random weights ties have probability zero.

Expert compute has three equivalent forms (:attr:`MoE.impl`): ``"loop"`` runs each expert on its tokens (eager
PyTorch, data-dependent shapes), ``"gather"`` gathers the chosen experts' weights per token (static shapes: what
``torch.compile(fullgraph=True)`` and ONNX export see by default), ``"dense"`` runs every expert on every token
and masks (static, E times the work; fastest for tiny expert counts in some runtimes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import SwiGLU

IMPLS = ("auto", "loop", "gather", "dense")


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int, *,
          num_groups: int = 1, topk_group: int = 1, grouped: bool = True, renormalize: bool = True,
          scaling: float = 1.0, activation: str = "sigmoid"):
    """Router of :mod:`kda_compile.moe` (see the module docstring): ``x [N, hidden]``, ``weight [E, hidden]``,
    ``bias [E]`` or None -> ``(weights [N, top_k] in >= float32, indices [N, top_k] int64)``."""
    f = torch.promote_types(x.dtype, torch.float32)           # float32 (float64 stays float64)
    logits = x.to(f) @ weight.to(f).t()
    if activation == "sigmoid":
        scores = torch.sigmoid(logits)
    elif activation == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        raise ValueError(f"router activation must be 'sigmoid' or 'softmax', got {activation!r}")
    choice = scores if bias is None else scores + bias.to(f)
    E = weight.shape[0]
    if grouped and num_groups > 1:
        per = E // num_groups
        group_scores = choice.view(-1, num_groups, per).topk(min(2, per), dim=-1).values.sum(-1)   # [N, G]
        keep = torch.zeros_like(group_scores).scatter(1, group_scores.topk(topk_group, dim=-1).indices, 1.0)
        keep = keep.unsqueeze(-1).expand(-1, num_groups, per).reshape(-1, E)
        choice = choice.masked_fill(keep == 0, float("-inf"))
    indices = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, indices


class MoE(nn.Module):
    """Routed SwiGLU experts (stacked weights ``w_gate, w_up [E, I, hidden]``, ``w_down [E, hidden, I]``) plus
    ``num_shared_experts`` shared experts (one SwiGLU of width ``I * num_shared_experts``)."""

    def __init__(self, config):
        super().__init__()
        c = config
        E, I, hidden = c.num_experts, c.moe_intermediate_size, c.hidden_size
        self.num_experts, self.top_k = E, c.num_experts_per_token
        self.router_options = dict(num_groups=c.num_expert_group, topk_group=c.topk_group,
                                   grouped=c.use_grouped_topk, renormalize=c.moe_renormalize,
                                   scaling=float(c.routed_scaling_factor), activation=c.moe_router_activation_func)
        # The router stays float32 whatever the model dtype (as Kimi Linear keeps it).
        self.router = nn.Linear(hidden, E, bias=False, dtype=torch.float32)
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        self.w_gate = nn.Parameter(torch.empty(E, I, hidden))
        self.w_up = nn.Parameter(torch.empty(E, I, hidden))
        self.w_down = nn.Parameter(torch.empty(E, hidden, I))
        self.shared = SwiGLU(hidden, I * c.num_shared_experts) if c.num_shared_experts else None
        self.impl = "auto"

    @torch.no_grad()
    def reset_moe_parameters(self, std: float) -> None:
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=std)
        nn.init.zeros_(self.e_score_correction_bias)

    def _apply(self, fn, recurse=True):
        # Keep the router and its bias in float32 when the model is cast to a half type.
        super()._apply(fn, recurse)
        for t in (self.router.weight, self.e_score_correction_bias):
            if t.dtype in (torch.float16, torch.bfloat16):
                t.data = t.data.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices = route(flat, self.router.weight, self.e_score_correction_bias, self.top_k,
                                 **self.router_options)
        impl = self.impl
        if impl == "auto":
            traced = torch.compiler.is_compiling() or torch.compiler.is_exporting()
            impl = "gather" if traced else "loop"
        out = {"loop": self._experts_loop, "gather": self._experts_gather, "dense": self._experts_dense}[impl](
            flat, weights, indices)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.reshape(shape)

    def _experts_loop(self, x, weights, indices):
        out = torch.zeros_like(x)
        for e in indices.unique().tolist():
            token, slot = torch.where(indices == e)
            h = F.silu(x[token] @ self.w_gate[e].t()) * (x[token] @ self.w_up[e].t())
            y = (h @ self.w_down[e].t()) * weights[token, slot, None].to(x.dtype)
            out.index_add_(0, token, y)
        return out

    def _experts_gather(self, x, weights, indices):
        gate, up, down = self.w_gate[indices], self.w_up[indices], self.w_down[indices]   # [N, k, ...]
        h = F.silu(torch.einsum("nd,nkid->nki", x, gate)) * torch.einsum("nd,nkid->nki", x, up)
        y = torch.einsum("nki,nkdi->nkd", h, down)                                      # [N, k, hidden]
        return (y * weights[..., None].to(x.dtype)).sum(1)

    def _experts_dense(self, x, weights, indices):
        combine = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
        combine = combine.scatter(1, indices, weights.to(x.dtype))                      # [N, E]
        h = F.silu(torch.einsum("nd,eid->nei", x, self.w_gate)) * torch.einsum("nd,eid->nei", x, self.w_up)
        return torch.einsum("nei,edi,ne->nd", h, self.w_down, combine)


def is_moe_layer(config, index: int) -> bool:
    """Whether layer ``index`` (0-based) has the MoE block: ``num_experts > 0``, past the first
    ``first_k_dense_replace`` dense layers, and every ``moe_layer_freq``-th layer."""
    c = config
    return bool(c.num_experts) and index >= c.first_k_dense_replace and index % max(c.moe_layer_freq, 1) == 0


__all__ = ["MoE", "route", "is_moe_layer", "IMPLS"]
