"""Kimi Linear ``config.json`` <-> :class:`kda_compile.model.HybridConfig`.

Reads both spellings of the published model's configuration: Moonshot's original keys (``linear_attn_config``
with 1-indexed ``kda_layers`` / ``full_attn_layers``, ``num_experts``, ``num_experts_per_token``, ...) and the
keys transformers writes for its ``KimiLinearForCausalLM`` (``layer_types``, ``mlp_layer_types``,
``linear_num_heads``, ``num_local_experts``, ``n_group``, ...).  Writes Moonshot's.  Keys without a meaning
here (token ids, ``architectures``, ``dtype``, ...) ride along in ``HybridConfig.extra_config`` and are
written back unchanged.

Kimi Linear's fixed choices, set on every config read: KDA value heads = key heads and V = K = ``head_dim``,
low-rank gates of rank ``head_dim``, no output-gate bias, the gate ``-exp(A_log) softplus(.)`` (unless
``gate_lower_bound`` is given); MLA without rotary embedding (``mla_use_nope``) with an un-rotated shared key
part of ``qk_rope_head_dim``, latent RMSNorm eps 1e-6.
"""
from __future__ import annotations

import json
import os

MODEL_TYPE = "kimi_linear"
LATENT_NORM_EPS = 1e-6          # Kimi Linear's q_a / kv_a layernorms use the RMSNorm default, not rms_norm_eps

# The keys this module consumes (both spellings); everything else goes to extra_config.
_CONSUMED = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "initializer_range", "rms_norm_eps", "tie_word_embeddings",
    "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "mla_use_nope",
    "num_experts", "num_local_experts", "num_experts_per_token", "num_experts_per_tok", "num_shared_experts",
    "n_shared_experts", "moe_intermediate_size", "first_k_dense_replace", "moe_layer_freq",
    "moe_router_activation_func", "moe_renormalize", "norm_topk_prob", "routed_scaling_factor", "use_grouped_topk",
    "num_expert_group", "n_group", "topk_group", "linear_attn_config", "layer_types", "mlp_layer_types",
    "linear_num_heads", "linear_head_dim", "linear_conv_kernel_dim", "head_dim", "qk_head_dim",
    "mla_use_output_gate", "architectures",
}


def _get(data: dict, *names, default=None):
    for name in names:
        if name in data and data[name] is not None:
            return data[name]
    return default


def _layer_split(data: dict, n: int) -> tuple:
    """0-based MLA layer indices from ``linear_attn_config`` (1-indexed lists) or transformers' ``layer_types``."""
    lac = data.get("linear_attn_config")
    if isinstance(lac, dict) and lac.get("kda_layers") is not None and lac.get("full_attn_layers") is not None:
        kda, full = [int(i) for i in lac["kda_layers"]], [int(i) for i in lac["full_attn_layers"]]
        if sorted(kda + full) != list(range(1, n + 1)):
            raise ValueError(f"linear_attn_config: kda_layers {kda} and full_attn_layers {full} must split the "
                             f"1-indexed layers 1..{n} (num_hidden_layers={n}) exactly")
        return tuple(i - 1 for i in full)
    types = data.get("layer_types")
    if types is not None:
        if len(types) != n or not set(types) <= {"linear_attention", "full_attention"}:
            raise ValueError(f"layer_types must list {n} entries of 'linear_attention' / 'full_attention', got {types}")
        return tuple(i for i, t in enumerate(types) if t == "full_attention")
    if lac is None and "linear_attn_config" in data:
        return tuple(range(n))                       # no linear attention at all: every layer MLA
    raise ValueError("config.json has neither linear_attn_config (kda_layers, full_attn_layers) nor layer_types: "
                     "cannot tell which layers are KDA")


def _first_dense(data: dict, n: int) -> int:
    types = data.get("mlp_layer_types")
    if types is None:
        return int(_get(data, "first_k_dense_replace", default=0))
    k = next((i for i, t in enumerate(types) if t != "dense"), len(types))
    if any(t != "sparse" for t in types[k:]):
        raise ValueError(f"mlp_layer_types must be some 'dense' layers then only 'sparse' ones, got {types}")
    return k


def config_from_kimi(cls, data: dict, **overrides):
    """A ``cls`` (HybridConfig) from a Kimi Linear config dict; ``overrides`` replace fields afterwards."""
    if not isinstance(data, dict):
        raise TypeError(f"a Kimi Linear config must be a dict (the parsed config.json), got {type(data).__name__}")
    if data.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(f"config.json has model_type {data.get('model_type')!r}, expected {MODEL_TYPE!r}")
    if _get(data, "hidden_act", default="silu") != "silu":
        raise ValueError(f"hidden_act {data['hidden_act']!r} is not supported (Kimi Linear uses 'silu')")
    if data.get("mla_use_nope") is False and _get(data, "qk_rope_head_dim", default=0):
        raise ValueError("mla_use_nope=False (rotary embedding on the MLA layers) is not supported: Kimi Linear's "
                         "MLA layers are NoPE")
    if data.get("mla_use_output_gate"):
        raise ValueError("mla_use_output_gate=True (an output gate on MLA) is not supported")
    lac = data.get("linear_attn_config") or {}
    if lac.get("use_full_rank_gate"):
        raise ValueError("linear_attn_config.use_full_rank_gate=True is not supported (Kimi Linear's gate is low-rank)")
    n = int(data["num_hidden_layers"])
    heads = int(_get(lac, "num_heads", default=_get(data, "linear_num_heads", default=32)))
    head_dim = int(_get(lac, "head_dim", default=_get(data, "linear_head_dim", default=128)))
    mla_heads = int(data["num_attention_heads"])
    kv_heads = _get(data, "num_key_value_heads", default=mla_heads)
    if int(kv_heads) != mla_heads:
        raise ValueError(f"num_key_value_heads={kv_heads} must equal num_attention_heads={mla_heads} (MLA)")
    num_experts = int(_get(data, "num_experts", "num_local_experts", default=0))
    fields = dict(
        vocab_size=int(data["vocab_size"]), hidden_size=int(data["hidden_size"]), num_layers=n,
        mla_layers=_layer_split(data, n), intermediate_size=int(data["intermediate_size"]),
        rms_norm_eps=float(_get(data, "rms_norm_eps", default=1e-6)),
        tie_word_embeddings=bool(_get(data, "tie_word_embeddings", default=False)),
        initializer_range=float(_get(data, "initializer_range", default=0.02)),
        num_heads=heads, num_v_heads=None, head_dim=head_dim, v_head_dim=head_dim, gate_rank=head_dim,
        conv_size=int(_get(lac, "short_conv_kernel_size", default=_get(data, "linear_conv_kernel_dim", default=4))),
        kda_output_gate_bias=False, kda_lower_bound=_get(lac, "gate_lower_bound"),
        mla_num_heads=mla_heads, mla_qk_head_dim=int(data["qk_nope_head_dim"]),
        mla_v_head_dim=int(data["v_head_dim"]), mla_rope_head_dim=int(_get(data, "qk_rope_head_dim", default=0)),
        mla_latent_norm_eps=LATENT_NORM_EPS, kv_lora_rank=int(data["kv_lora_rank"]),
        q_lora_rank=_get(data, "q_lora_rank"),
        num_experts=num_experts,
        extra_config={k: v for k, v in data.items() if k not in _CONSUMED},
    )
    if num_experts:
        fields.update(
            num_experts_per_token=int(_get(data, "num_experts_per_token", "num_experts_per_tok", default=1)),
            moe_intermediate_size=int(data["moe_intermediate_size"]),
            num_shared_experts=int(_get(data, "num_shared_experts", "n_shared_experts", default=0)),
            first_k_dense_replace=_first_dense(data, n),
            moe_layer_freq=int(_get(data, "moe_layer_freq", default=1)),
            moe_router_activation_func=str(_get(data, "moe_router_activation_func", default="sigmoid")),
            moe_renormalize=bool(_get(data, "moe_renormalize", "norm_topk_prob", default=True)),
            routed_scaling_factor=float(_get(data, "routed_scaling_factor", default=1.0)),
            use_grouped_topk=bool(_get(data, "use_grouped_topk", default=True)),
            num_expert_group=int(_get(data, "num_expert_group", "n_group", default=1)),
            topk_group=int(_get(data, "topk_group", default=1)))
    fields.update(overrides)
    return cls(**fields)


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"this HybridConfig has no Kimi Linear config.json form: {what}")


def config_to_kimi(config) -> dict:
    """The Moonshot-format ``config.json`` dict of ``config``; ValueError naming the first field that Kimi
    Linear's format cannot express (e.g. grouped value heads or an output-gate bias)."""
    c = config
    _require(c.kda_num_v_heads == c.num_heads, f"num_v_heads={c.num_v_heads} must equal num_heads={c.num_heads}")
    _require(c.v_head_dim == c.head_dim, f"v_head_dim={c.v_head_dim} must equal head_dim={c.head_dim}")
    _require(c.kda_gate_rank == c.head_dim, f"gate_rank={c.kda_gate_rank} must equal head_dim={c.head_dim}")
    _require(not c.kda_output_gate_bias, "kda_output_gate_bias must be False")
    _require(c.mla_norm_eps == LATENT_NORM_EPS, f"mla_latent_norm_eps must be {LATENT_NORM_EPS}")
    types = c.layer_types
    lac = {"kda_layers": [i + 1 for i, t in enumerate(types) if t == "kda"],
           "full_attn_layers": [i + 1 for i, t in enumerate(types) if t == "mla"],
           "num_heads": c.num_heads, "head_dim": c.head_dim, "short_conv_kernel_size": c.conv_size}
    if c.kda_lower_bound is not None:
        lac["gate_lower_bound"] = c.kda_lower_bound
    out = {"architectures": ["KimiLinearForCausalLM"], "model_type": MODEL_TYPE,
           "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": c.num_layers, "num_attention_heads": c.mla_heads,
           "num_key_value_heads": c.mla_heads, "hidden_act": "silu", "initializer_range": c.initializer_range,
           "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": c.tie_word_embeddings,
           "q_lora_rank": c.q_lora_rank, "kv_lora_rank": c.kv_lora_rank, "qk_nope_head_dim": c.mla_qk_head_dim,
           "qk_rope_head_dim": c.mla_rope_head_dim, "v_head_dim": c.mla_v_head_dim, "mla_use_nope": True,
           "linear_attn_config": lac}
    if c.num_experts:
        out.update(num_experts=c.num_experts, num_experts_per_token=c.num_experts_per_token,
                   num_shared_experts=c.num_shared_experts, moe_intermediate_size=c.moe_intermediate_size,
                   first_k_dense_replace=c.first_k_dense_replace, moe_layer_freq=c.moe_layer_freq,
                   moe_router_activation_func=c.moe_router_activation_func, moe_renormalize=c.moe_renormalize,
                   routed_scaling_factor=c.routed_scaling_factor, use_grouped_topk=c.use_grouped_topk,
                   num_expert_group=c.num_expert_group, topk_group=c.topk_group)
    else:
        out["num_experts"] = None
    for key, value in c.extra_config.items():
        out.setdefault(key, value)
    return out


def read_config_json(path: str) -> dict:
    """The parsed ``config.json`` at ``path`` (a checkpoint folder or the file)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json at {path!r} (expected a checkpoint folder holding config.json)")
    with open(file) as f:
        return json.load(f)


def write_config_json(data: dict, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    file = os.path.join(folder, "config.json")
    with open(file, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    return file
