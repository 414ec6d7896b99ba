"""A Kimi-Linear-style hybrid decoder: KDA layers interleaved with MLA layers (default 3:1), its cache, and
safetensors save/load.

    from kda_compile.model import HybridConfig, HybridModel
    model = HybridModel(HybridConfig.tiny())
    logits = model(input_ids)                                   # [B, T] long -> [B, T, vocab]
    logits, cache = model.forward_cached(input_ids, None)       # prefill (chunk op)
    logits, cache = model.forward_cached(next_token, cache)     # decode step (recurrent op)
    tokens = model.generate(input_ids, max_new_tokens=16)       # greedy by default
    logits = model(shard(input_ids, ctx), cp_context=ctx)       # context parallel (docs/context_parallel.md)

The cached forward is functional: it returns a new :class:`HybridCache` and never mutates the one passed in,
so ``torch.compile(fullgraph=True)`` and ONNX export see the cache as plain inputs and outputs
(:meth:`HybridCache.flatten` / :meth:`HybridCache.unflatten` / :meth:`HybridCache.tensor_names`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import nn

from .layers import KDALayer, MLALayer, RMSNorm, SwiGLU
from .moe import MoE, is_moe_layer
from .reference import compute_dtype

KDA, MLA = "kda", "mla"


@dataclass
class HybridConfig:
    """Sizes of the hybrid model.  ``mla_layers`` lists the MLA layer indices; None means every
    ``mla_every``-th layer (indices 3, 7, 11, ... for the default 4: Kimi Linear's 3:1 ratio).

    ``num_experts > 0`` gives layers past the first ``first_k_dense_replace`` a mixture-of-experts block
    (:mod:`kda_compile.moe`) instead of the SwiGLU MLP.  A Kimi Linear ``config.json`` reads and writes with
    :meth:`from_pretrained` / :meth:`save_pretrained` (:mod:`kda_compile.kimi_config`)."""

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_layers: int = 24
    mla_layers: tuple | None = None
    mla_every: int = 4
    intermediate_size: int = 5632          # SwiGLU width
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # KDA layers
    num_heads: int = 16                    # key/query heads H
    num_v_heads: int | None = None         # value heads HV (a multiple of H; default H)
    head_dim: int = 128                    # K
    v_head_dim: int = 128                  # V
    conv_size: int = 4                     # short causal conv width
    gate_rank: int | None = None           # low rank of the decay-gate and output-gate projections (default V)
    chunk_size: int = 64
    kda_backend: str | None = None         # force a KDA backend ("reference", "triton", "tilelang"); None: dispatch
    kda_output_gate_bias: bool = True      # bias on the output gate's second projection (Kimi Linear: none)
    kda_lower_bound: float | None = None   # None: gate -exp(A_log) softplus(.) (Kimi Linear); else the bounded gate
    # MLA layers
    mla_num_heads: int | None = None       # default num_heads
    mla_qk_head_dim: int = 128             # per-head query/key dims without the shared part (qk_nope_head_dim)
    mla_v_head_dim: int = 128
    mla_rope_head_dim: int = 0             # shared, un-rotated key part of every head (Kimi: qk_rope_head_dim)
    mla_latent_norm_eps: float | None = None   # eps of the latent / query RMSNorms (None: rms_norm_eps)
    kv_lora_rank: int = 512                # latent (cached) dimension per token
    q_lora_rank: int | None = 1536         # None: full-rank query projection
    # Mixture of experts (num_experts = 0: every layer has the SwiGLU MLP)
    num_experts: int = 0
    num_experts_per_token: int = 1
    moe_intermediate_size: int | None = None   # expert width (default intermediate_size)
    num_shared_experts: int = 0
    first_k_dense_replace: int = 0         # the first k layers keep the dense MLP
    moe_layer_freq: int = 1
    moe_router_activation_func: str = "sigmoid"
    moe_renormalize: bool = True
    routed_scaling_factor: float = 1.0
    use_grouped_topk: bool = True
    num_expert_group: int = 1
    topk_group: int = 1
    # Keys of a checkpoint's config.json with no meaning here (token ids, dtype, ...), written back unchanged.
    extra_config: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mla_layers is not None:
            self.mla_layers = tuple(int(i) for i in self.mla_layers)
        if self.num_experts and self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        self.validate()

    # --------------------------------------------------------------------------------------- derived
    @property
    def kda_num_v_heads(self) -> int:
        return self.num_v_heads or self.num_heads

    @property
    def kda_gate_rank(self) -> int:
        return self.gate_rank or self.v_head_dim

    @property
    def mla_heads(self) -> int:
        return self.mla_num_heads or self.num_heads

    @property
    def mla_norm_eps(self) -> float:
        return self.rms_norm_eps if self.mla_latent_norm_eps is None else self.mla_latent_norm_eps

    @property
    def mla_cache_dim(self) -> int:
        """Width of an MLA layer's cache per token: ``kv_lora_rank + mla_rope_head_dim``."""
        return self.kv_lora_rank + self.mla_rope_head_dim

    @property
    def mlp_types(self) -> list[str]:
        """``"moe"`` or ``"dense"`` for each layer."""
        return ["moe" if is_moe_layer(self, i) else "dense" for i in range(self.num_layers)]

    @property
    def layer_types(self) -> list[str]:
        """``"kda"`` or ``"mla"`` for each layer."""
        if self.mla_layers is not None:
            mla = set(self.mla_layers)
        else:
            mla = {i for i in range(self.num_layers) if (i + 1) % self.mla_every == 0}
        return [MLA if i in mla else KDA for i in range(self.num_layers)]

    @property
    def conv_channels(self) -> int:
        """Channels of a KDA layer's short conv (and its conv state): ``2 H K + HV V``."""
        return 2 * self.num_heads * self.head_dim + self.kda_num_v_heads * self.v_head_dim

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        positive = ("vocab_size", "hidden_size", "num_layers", "mla_every", "intermediate_size", "num_heads",
                    "head_dim", "v_head_dim", "conv_size", "mla_qk_head_dim", "mla_v_head_dim", "kv_lora_rank")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"HybridConfig.{name} must be a positive int, got {value!r}")
        if self.kda_num_v_heads % self.num_heads:
            raise ValueError(f"HybridConfig.num_v_heads={self.num_v_heads} must be a multiple of "
                             f"num_heads={self.num_heads}")
        if self.chunk_size not in (32, 64):
            raise ValueError(f"HybridConfig.chunk_size must be 32 or 64, got {self.chunk_size}")
        if self.mla_layers is not None and any(not 0 <= i < self.num_layers for i in self.mla_layers):
            raise ValueError(f"HybridConfig.mla_layers must lie in [0, {self.num_layers}), got {self.mla_layers}")
        if self.mla_num_heads is not None and (not isinstance(self.mla_num_heads, int) or self.mla_num_heads < 1):
            raise ValueError(f"HybridConfig.mla_num_heads must be a positive int or None, got {self.mla_num_heads!r}")
        if not isinstance(self.mla_rope_head_dim, int) or self.mla_rope_head_dim < 0:
            raise ValueError(f"HybridConfig.mla_rope_head_dim must be an int >= 0, got {self.mla_rope_head_dim!r}")
        if self.num_experts:
            self._validate_moe()

    def _validate_moe(self) -> None:
        for name in ("num_experts", "num_experts_per_token", "moe_intermediate_size", "num_expert_group",
                     "topk_group", "moe_layer_freq"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"HybridConfig.{name} must be a positive int when num_experts > 0, got {value!r}")
        if self.num_experts_per_token > self.num_experts:
            raise ValueError(f"HybridConfig.num_experts_per_token={self.num_experts_per_token} exceeds "
                             f"num_experts={self.num_experts}")
        if self.num_experts % self.num_expert_group:
            raise ValueError(f"HybridConfig.num_experts={self.num_experts} must be a multiple of "
                             f"num_expert_group={self.num_expert_group}")
        if self.topk_group > self.num_expert_group:
            raise ValueError(f"HybridConfig.topk_group={self.topk_group} exceeds num_expert_group="
                             f"{self.num_expert_group}")
        if self.moe_router_activation_func not in ("sigmoid", "softmax"):
            raise ValueError("HybridConfig.moe_router_activation_func must be 'sigmoid' or 'softmax', got "
                             f"{self.moe_router_activation_func!r}")

    # -------------------------------------------------------------------------------------- presets
    @classmethod
    def tiny(cls, **overrides) -> "HybridConfig":
        """A 4-layer model (3 KDA + 1 MLA, ~0.2M parameters) that runs in well under a second on a CPU."""
        sizes = dict(vocab_size=128, hidden_size=64, num_layers=4, intermediate_size=128, num_heads=2,
                     head_dim=16, v_head_dim=16, conv_size=4, gate_rank=8, mla_num_heads=2, mla_qk_head_dim=16,
                     mla_v_head_dim=16, kv_lora_rank=24, q_lora_rank=32)
        sizes.update(overrides)
        return cls(**sizes)

    @classmethod
    def tiny_kimi(cls, **overrides) -> "HybridConfig":
        """A 4-layer Kimi-Linear-shaped model (KDA, KDA, MLA, KDA; MoE of 8 experts, top-2 of 2 groups, one shared
        expert, layer 0 dense; MLA with a shared key part, no output-gate bias): the published architecture at
        a CPU-test size."""
        sizes = dict(vocab_size=128, hidden_size=64, num_layers=4, mla_layers=(2,), intermediate_size=96,
                     num_heads=2, head_dim=16, v_head_dim=16, conv_size=4, gate_rank=16, mla_num_heads=2,
                     mla_qk_head_dim=16, mla_v_head_dim=16, mla_rope_head_dim=8, mla_latent_norm_eps=1e-6,
                     kv_lora_rank=24, q_lora_rank=None, kda_output_gate_bias=False, rms_norm_eps=1e-5,
                     num_experts=8, num_experts_per_token=2, moe_intermediate_size=32, num_shared_experts=1,
                     first_k_dense_replace=1, routed_scaling_factor=2.5, num_expert_group=2, topk_group=1,
                     extra_config={"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": None})
        sizes.update(overrides)
        return cls(**sizes)

    # ---------------------------------------------------------------------------- Kimi config.json
    @classmethod
    def from_kimi_dict(cls, data: dict, **overrides) -> "HybridConfig":
        """From the dict of a Kimi Linear ``config.json`` (Moonshot's keys or transformers' own)."""
        from .kimi_config import config_from_kimi
        return config_from_kimi(cls, data, **overrides)

    def to_kimi_dict(self) -> dict:
        """The ``config.json`` dict of this config in Kimi Linear's (Moonshot's) format."""
        from .kimi_config import config_to_kimi
        return config_to_kimi(self)

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "HybridConfig":
        """Read ``path/config.json`` (``path`` a checkpoint folder or the file itself) of a Kimi Linear model."""
        from .kimi_config import read_config_json
        return cls.from_kimi_dict(read_config_json(path), **overrides)

    def save_pretrained(self, folder: str) -> str:
        """Write ``folder/config.json`` in Kimi Linear's format; returns its path."""
        from .kimi_config import write_config_json
        return write_config_json(self.to_kimi_dict(), folder)

    def full_attention(self) -> "HybridConfig":
        """The same model with every layer an attention (MLA, SDPA) layer: the baseline of the benchmark."""
        return dataclasses.replace(self, mla_layers=tuple(range(self.num_layers)))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "HybridConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        data = json.loads(text)
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown HybridConfig fields {unknown}")
        return cls(**data)


# ------------------------------------------------------------------------------------------------ cache

@dataclass
class HybridCache:
    """Everything a decode step needs from the tokens before it, per layer, in layer order:

    * KDA layer: ``conv_state [B, conv_channels, conv_size - 1]`` (model dtype) and
      ``recurrent_state [B, HV, K, V]`` (float32; float64 for a float64 model);
    * MLA layer: ``latent_kv [B, L, kv_lora_rank + mla_rope_head_dim]`` (model dtype; L = tokens so far, may
      be 0; the normalised latent, then the shared key part when ``mla_rope_head_dim > 0``).

    ``layers[i]`` is the tuple of layer i.  :meth:`flatten` lists the tensors in exactly that order (layer 0's
    tensors first; a KDA layer gives conv_state then recurrent_state), and :meth:`tensor_names` names them
    ``layer{i}_conv_state``, ``layer{i}_recurrent_state``, ``layer{i}_latent_kv``.
    """

    layers: list

    @staticmethod
    def empty(config: HybridConfig, batch_size: int, device=None, dtype=torch.float32) -> "HybridCache":
        """The cache of no tokens: zero conv/recurrent states and 0-length latents."""
        c = config
        layers = []
        for kind in c.layer_types:
            if kind == KDA:
                layers.append((torch.zeros(batch_size, c.conv_channels, c.conv_size - 1, device=device, dtype=dtype),
                               torch.zeros(batch_size, c.kda_num_v_heads, c.head_dim, c.v_head_dim, device=device,
                                           dtype=compute_dtype(dtype))))
            else:
                layers.append((torch.zeros(batch_size, 0, c.mla_cache_dim, device=device, dtype=dtype),))
        return HybridCache(layers)

    def flatten(self) -> list:
        """All tensors in the documented order (see the class docstring)."""
        return [t for layer in self.layers for t in layer]

    @staticmethod
    def unflatten(config: HybridConfig, tensors) -> "HybridCache":
        """Inverse of :meth:`flatten`."""
        tensors = list(tensors)
        want = sum(2 if kind == KDA else 1 for kind in config.layer_types)
        if len(tensors) != want:
            raise ValueError(f"HybridCache.unflatten needs {want} tensors for this config, got {len(tensors)}")
        layers, i = [], 0
        for kind in config.layer_types:
            n = 2 if kind == KDA else 1
            layers.append(tuple(tensors[i:i + n]))
            i += n
        return HybridCache(layers)

    @staticmethod
    def tensor_names(config: HybridConfig, prefix: str = "") -> list:
        """Names of the flattened tensors (for ONNX input/output names, e.g. with prefix ``"past_"`` /
        ``"present_"``)."""
        names = []
        for i, kind in enumerate(config.layer_types):
            if kind == KDA:
                names += [f"{prefix}layer{i}_conv_state", f"{prefix}layer{i}_recurrent_state"]
            else:
                names.append(f"{prefix}layer{i}_latent_kv")
        return names

    @property
    def seq_len(self) -> int:
        """Tokens seen so far, read from the first MLA latent (0 when the model has no MLA layer)."""
        for layer in self.layers:
            if len(layer) == 1:
                return layer[0].shape[1]
        return 0

    def nbytes(self) -> int:
        """Memory held by the cache, in bytes."""
        return sum(t.numel() * t.element_size() for t in self.flatten())


def _cache_flatten(cache: HybridCache):
    return cache.flatten(), [len(layer) for layer in cache.layers]


def _cache_unflatten(values, sizes) -> HybridCache:
    values, layers, i = list(values), [], 0
    for n in sizes:
        layers.append(tuple(values[i:i + n]))
        i += n
    return HybridCache(layers)


# A pytree node, so torch.export / the dynamo ONNX exporter and torch.compile see the cache as its tensors.
pytree.register_pytree_node(HybridCache, _cache_flatten, _cache_unflatten,
                            serialized_type_name="kda_compile.model.HybridCache")


# ------------------------------------------------------------------------------------------------ model

class HybridBlock(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``; the mixer is KDA or MLA, the
    MLP a SwiGLU or a mixture of experts."""

    def __init__(self, config: HybridConfig, kind: str, moe: bool = False):
        super().__init__()
        self.kind = kind
        self.mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = KDALayer(config) if kind == KDA else MLALayer(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if moe else SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cache: tuple | None, want_cache: bool, cp_context=None):
        h = self.mixer_norm(x)
        if self.kind == KDA:
            conv_state, state = cache if cache is not None else (None, None)
            h, conv_state, state = self.mixer(h, conv_state, state, want_state=want_cache, cp_context=cp_context)
            new = (conv_state, state)
        else:
            h, latent = self.mixer(h, cache[0] if cache is not None else None, cp_context=cp_context)
            new = (latent,)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), new


class HybridModel(nn.Module):
    """The hybrid decoder: embedding -> blocks (KDA / MLA per ``config.layer_types``) -> RMSNorm -> LM head."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        if not isinstance(config, HybridConfig):
            raise TypeError(f"config must be a HybridConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(HybridBlock(config, kind, mlp == "moe")
                                    for kind, mlp in zip(config.layer_types, config.mlp_types))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) linears and embedding, ones for norms, the KDA init for A_log/dt_bias."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.initializer_range)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, KDALayer):
                module.reset_kda_parameters()
            elif isinstance(module, MoE):
                module.reset_moe_parameters(self.config.initializer_range)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    # ------------------------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None, use_cache: bool = False, *,
                cp_context=None):
        """``input_ids [B, T]`` -> logits ``[B, T, vocab]``; with ``cache`` given or ``use_cache=True`` returns
        ``(logits, new_cache)`` (the cached forward, see :meth:`forward_cached`).

        ``cp_context`` (:func:`kda_compile.context_parallel.build_cp_context`, global offsets of the pack
        or ``total_tokens``): context parallelism, the training-style forward of a sequence (or varlen pack)
        split over the context's ranks.  ``input_ids [1, T_local]`` are this rank's tokens (its pieces
        concatenated in local order, :func:`kda_compile.cp_context.shard`) and the logits ``[1, T_local,
        vocab]`` are theirs; each sequence of the pack starts from an empty state.  KDA layers run
        ``chunk_kda`` with the context (and the convolution halo), MLA layers attend over the gathered
        latents (docs/context_parallel.md, "Model").  Every rank must call it, and backpropagate; the
        parameters' gradients are this rank's share (sum them over the group, as DDP does).  No cache."""
        self._check_input(input_ids, cache)
        if cp_context is not None:
            self._check_cp(input_ids, cache, use_cache, cp_context)
        want_cache = use_cache or cache is not None
        x = self.embed(input_ids)
        new_layers = []
        for i, block in enumerate(self.blocks):
            x, new = block(x, cache.layers[i] if cache is not None else None, want_cache, cp_context)
            new_layers.append(new)
        logits = self.lm_head(self.norm(x))
        return (logits, HybridCache(new_layers)) if want_cache else logits

    def forward_cached(self, input_ids: torch.Tensor, cache: HybridCache | None = None):
        """Functional cached forward: ``(logits [B, T, vocab], new_cache)``.  ``cache`` (None = no tokens
        yet) is not modified.  T > 1 runs the chunk KDA op (prefill), T == 1 the recurrent op (decode)."""
        return self.forward(input_ids, cache, use_cache=True)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True, **kwargs) -> torch.Tensor:
        """Prompt ``[B, T]`` -> ``[B, T + max_new_tokens]`` tokens, using the cache (see
        :func:`kda_compile.generation.generate` for sampling options and a compiled step)."""
        from .generation import generate
        return generate(self, input_ids, max_new_tokens, greedy=greedy, **kwargs)

    def _check_cp(self, input_ids, cache, use_cache, ctx) -> None:
        from .cp_context import KDAContext
        if not isinstance(ctx, KDAContext):
            raise TypeError(f"cp_context must be a KDAContext (see build_cp_context), got {type(ctx).__name__}")
        if cache is not None or use_cache:
            raise ValueError("cp_context is for the training-style forward of whole sequences: cache and "
                             "use_cache (prefill / decode) are not supported with it")
        if tuple(input_ids.shape) != (1, ctx.num_local_tokens):
            raise ValueError(f"with cp_context, input_ids must have shape [1, {ctx.num_local_tokens}] (rank "
                             f"{ctx.rank}'s pieces {list(ctx.local_pieces)}), got {list(input_ids.shape)}")
        if ctx.conv1d_kernel_size not in (None, self.config.conv_size):
            raise ValueError(f"cp_context.conv1d_kernel_size={ctx.conv1d_kernel_size} differs from the model's "
                             f"conv_size={self.config.conv_size}")

    def _check_input(self, input_ids, cache) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of shape [B, T], got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be int64 (or int32) token ids of shape [B, T], got {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [B, T] with T >= 1, got {list(input_ids.shape)}")
        if cache is None:
            return
        if not isinstance(cache, HybridCache):
            raise TypeError(f"cache must be a HybridCache or None, got {type(cache).__name__}")
        if len(cache.layers) != len(self.blocks):
            raise ValueError(f"cache has {len(cache.layers)} layers, the model {len(self.blocks)}")
        for i, (layer, kind) in enumerate(zip(cache.layers, self.config.layer_types)):
            if len(layer) != (2 if kind == KDA else 1) or layer[0].shape[0] != input_ids.shape[0]:
                raise ValueError(f"cache layer {i} ({kind}) does not match: expected "
                                 f"{'(conv_state, recurrent_state)' if kind == KDA else '(latent_kv,)'} with batch "
                                 f"size {input_ids.shape[0]}, got shapes {[list(t.shape) for t in layer]}")

    # ------------------------------------------------------------------------------- save / load
    @classmethod
    def from_pretrained(cls, path: str, *, dtype=None, device=None, layout: str | None = None,
                        **overrides) -> "HybridModel":
        """Load a Kimi Linear checkpoint folder (``config.json`` + safetensors shards + index), in Moonshot's
        tensor layout or transformers' (``layout=None`` detects it), lazily shard by shard; see
        :mod:`kda_compile.checkpoint`.  ``overrides`` set HybridConfig fields (e.g. ``kda_backend``)."""
        from .checkpoint import load_pretrained
        return load_pretrained(cls, path, dtype=dtype, device=device, layout=layout, **overrides)

    def save_pretrained(self, folder: str, *, layout: str = "moonshot", max_shard_bytes: int = 5 << 30) -> list:
        """Write a Kimi Linear checkpoint folder (config.json, safetensors shards, index); returns the shards."""
        from .checkpoint import save_pretrained
        return save_pretrained(self, folder, layout=layout, max_shard_bytes=max_shard_bytes)

    def save(self, path: str) -> None:
        """Write the weights and config to one ``.safetensors`` file (config JSON in its metadata; no pickle)."""
        from safetensors.torch import save_file
        state = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, path, metadata={"kda_compile.config": self.config.to_json()})

    @classmethod
    def load(cls, path: str, device=None, dtype=None) -> "HybridModel":
        """Read a model written by :meth:`save`."""
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "kda_compile.config" not in meta:
            raise ValueError(f"{path} has no kda_compile.config metadata: not written by HybridModel.save")
        model = cls(HybridConfig.from_json(meta["kda_compile.config"]))
        state = load_file(path)
        strict = not model.config.tie_word_embeddings
        missing, unexpected = model.load_state_dict(state, strict=strict)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:
            raise ValueError(f"{path} does not match the config: missing {missing}, unexpected {unexpected}")
        return model.to(device=device, dtype=dtype)
