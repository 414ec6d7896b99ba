"""Kimi Linear checkpoint folders (``config.json`` + sharded safetensors + ``model.safetensors.index.json``)
<-> :class:`kda_compile.model.HybridModel`.

Two tensor layouts are read (and written, ``layout=``):

* ``"moonshot"``, the published checkpoint: ``model.layers.{i}.self_attn.{q,k,v}_conv1d.weight``
  ``[H K, 1, W]``, ``self_attn.{f_a_proj,f_b_proj,A_log,dt_bias}``, ``block_sparse_moe.gate.weight``,
  ``block_sparse_moe.gate.e_score_correction_bias``, ``block_sparse_moe.experts.{e}.w1/w3/w2.weight`` (gate, up,
  down), ``block_sparse_moe.shared_experts.*``;
* ``"transformers"``, the names of transformers' in-memory ``KimiLinearForCausalLM`` (its conversion mapping):
  one ``self_attn.conv1d.weight`` ``[3 H K, 1, W]``, ``self_attn.forget_gate.{f_a_proj,f_b_proj,A_log,dt_bias}``,
  ``mlp.`` instead of ``block_sparse_moe.``, experts fused to ``mlp.experts.gate_up_proj [E, 2 I, hidden]`` and
  ``mlp.experts.down_proj [E, hidden, I]``.

Loading is lazy: the model is built without memory on the ``meta`` device, materialised empty, and each shard is
opened with ``safetensors`` (no pickle) and copied tensor by tensor, so peak memory is the model plus one tensor.
Every checkpoint tensor must map to a parameter and every parameter be covered: a missing, unexpected or
wrong-shaped tensor raises ValueError naming it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

LAYOUTS = ("moonshot", "transformers")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class Part:
    """``ours[our_index]`` <-> ``checkpoint_tensor[ckpt_index]`` (reshaped to each other's shape)."""

    ours: str
    our_index: tuple = ()
    ckpt_index: tuple = ()


@dataclass(frozen=True)
class Entry:
    """One checkpoint tensor: its shape and the parameter regions it fills."""

    shape: tuple
    parts: tuple


def _plain(state: dict, ours: str) -> Entry:
    return Entry(tuple(state[ours].shape), (Part(ours),))


def _kda_entries(config, state: dict, ours: str, kimi: str, layout: str) -> dict:
    H, K, W = config.num_heads, config.head_dim, config.conv_size
    out = {f"{kimi}.{n}.weight": _plain(state, f"{ours}.{n}.weight")
           for n in ("q_proj", "k_proj", "v_proj", "b_proj", "o_proj")}
    gate = f"{kimi}.forget_gate" if layout == "transformers" else kimi
    out[f"{gate}.f_a_proj.weight"] = _plain(state, f"{ours}.f_proj.0.weight")
    out[f"{gate}.f_b_proj.weight"] = _plain(state, f"{ours}.f_proj.1.weight")
    out[f"{gate}.dt_bias"] = _plain(state, f"{ours}.dt_bias")
    out[f"{gate}.A_log"] = Entry((1, 1, H, 1), (Part(f"{ours}.A_log"),))
    out[f"{kimi}.g_a_proj.weight"] = _plain(state, f"{ours}.g_proj.0.weight")
    out[f"{kimi}.g_b_proj.weight"] = _plain(state, f"{ours}.g_proj.1.weight")
    out[f"{kimi}.o_norm.weight"] = _plain(state, f"{ours}.o_norm.weight")
    conv = f"{ours}.conv_weight"
    if layout == "transformers":
        out[f"{kimi}.conv1d.weight"] = Entry((3 * H * K, 1, W), (Part(conv),))
    else:
        for j, name in enumerate(("q", "k", "v")):
            rows = (slice(j * H * K, (j + 1) * H * K),)
            out[f"{kimi}.{name}_conv1d.weight"] = Entry((H * K, 1, W), (Part(conv, rows),))
    return out


def _mla_entries(config, state: dict, ours: str, kimi: str) -> dict:
    out = {f"{kimi}.kv_a_proj_with_mqa.weight": _plain(state, f"{ours}.kv_a_proj.weight"),
           f"{kimi}.kv_a_layernorm.weight": _plain(state, f"{ours}.kv_a_norm.weight"),
           f"{kimi}.kv_b_proj.weight": _plain(state, f"{ours}.kv_b_proj.weight"),
           f"{kimi}.o_proj.weight": _plain(state, f"{ours}.o_proj.weight")}
    if config.q_lora_rank:
        for kimi_name, ours_name in (("q_a_proj", "0"), ("q_a_layernorm", "1"), ("q_b_proj", "2")):
            out[f"{kimi}.{kimi_name}.weight"] = _plain(state, f"{ours}.q_proj.{ours_name}.weight")
    else:
        out[f"{kimi}.q_proj.weight"] = _plain(state, f"{ours}.q_proj.weight")
    return out


def _moe_entries(config, state: dict, ours: str, layer: str, layout: str) -> dict:
    E, I, hidden = config.num_experts, config.moe_intermediate_size, config.hidden_size
    kimi = f"{layer}.mlp" if layout == "transformers" else f"{layer}.block_sparse_moe"
    out = {f"{kimi}.gate.weight": _plain(state, f"{ours}.router.weight"),
           f"{kimi}.gate.e_score_correction_bias": _plain(state, f"{ours}.e_score_correction_bias")}
    if config.num_shared_experts:
        for n in ("gate_proj", "up_proj", "down_proj"):
            out[f"{kimi}.shared_experts.{n}.weight"] = _plain(state, f"{ours}.shared.{n}.weight")
    if layout == "transformers":
        out[f"{kimi}.experts.gate_up_proj"] = Entry((E, 2 * I, hidden), (
            Part(f"{ours}.w_gate", (), (slice(None), slice(0, I))),
            Part(f"{ours}.w_up", (), (slice(None), slice(I, 2 * I)))))
        out[f"{kimi}.experts.down_proj"] = Entry((E, hidden, I), (Part(f"{ours}.w_down"),))
    else:
        for e in range(E):
            for w, name, shape in (("w1", "w_gate", (I, hidden)), ("w3", "w_up", (I, hidden)),
                                   ("w2", "w_down", (hidden, I))):
                out[f"{kimi}.experts.{e}.{w}.weight"] = Entry(shape, (Part(f"{ours}.{name}", (e,)),))
    return out


def checkpoint_plan(model, layout: str = "moonshot") -> dict:
    """``{checkpoint tensor name: Entry}`` for ``model`` (a HybridModel) in ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    config = model.config
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    plan = {"model.embed_tokens.weight": _plain(state, "embed.weight"),
            "model.norm.weight": _plain(state, "norm.weight")}
    if not config.tie_word_embeddings:
        plan["lm_head.weight"] = _plain(state, "lm_head.weight")
    for i, (kind, mlp) in enumerate(zip(config.layer_types, config.mlp_types)):
        layer, ours = f"model.layers.{i}", f"blocks.{i}"
        plan[f"{layer}.input_layernorm.weight"] = _plain(state, f"{ours}.mixer_norm.weight")
        plan[f"{layer}.post_attention_layernorm.weight"] = _plain(state, f"{ours}.mlp_norm.weight")
        if kind == "kda":
            plan.update(_kda_entries(config, state, f"{ours}.mixer", f"{layer}.self_attn", layout))
        else:
            plan.update(_mla_entries(config, state, f"{ours}.mixer", f"{layer}.self_attn"))
        if mlp == "moe":
            plan.update(_moe_entries(config, state, f"{ours}.mlp", layer, layout))
        else:
            for n in ("gate_proj", "up_proj", "down_proj"):
                plan[f"{layer}.mlp.{n}.weight"] = _plain(state, f"{ours}.mlp.{n}.weight")
    uncovered = set(state) - {part.ours for entry in plan.values() for part in entry.parts}
    if uncovered:  # a parameter no checkpoint tensor would fill: the mapping is incomplete
        raise RuntimeError(f"no Kimi Linear checkpoint name for the parameters {sorted(uncovered)}")
    return plan


def detect_layout(names) -> str:
    """``"moonshot"`` or ``"transformers"`` from the tensor names (Moonshot's when nothing tells them apart)."""
    names = list(names)
    moonshot = any(".q_conv1d." in n or ".block_sparse_moe." in n for n in names)
    fused = any(".self_attn.conv1d." in n or ".forget_gate." in n or ".experts.gate_up_proj" in n for n in names)
    if moonshot and fused:
        raise ValueError("the checkpoint mixes Moonshot's tensor names (q_conv1d / block_sparse_moe) with "
                         "transformers' fused ones (conv1d / forget_gate / gate_up_proj)")
    return "transformers" if fused else "moonshot"


def shard_map(folder: str) -> dict:
    """``{tensor name: shard file path}`` of a checkpoint folder (index file, or one model.safetensors)."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        from safetensors import safe_open
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"{folder!r} has neither {INDEX_FILE} nor {SINGLE_FILE}")


def _config_dtype(config) -> torch.dtype:
    name = config.extra_config.get("dtype") or config.extra_config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


@torch.no_grad()
def load_pretrained(cls, path: str, *, dtype=None, device=None, layout: str | None = None, **overrides):
    """Build ``cls`` (HybridModel) from a Kimi Linear checkpoint folder; see the module docstring.  ``dtype``
    defaults to the ``dtype`` / ``torch_dtype`` of config.json (float32 when absent)."""
    from safetensors import safe_open

    from .model import HybridConfig
    config = HybridConfig.from_pretrained(path, **overrides)
    files = shard_map(path)
    layout = layout or detect_layout(files)
    dtype = dtype or _config_dtype(config)
    with torch.device("meta"):
        model = cls(config)
    model = model.to(dtype=dtype).to_empty(device=device or "cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers())
    plan = checkpoint_plan(model, layout)
    ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(n for n in files if n not in plan and n not in ignored)
    missing = sorted(n for n in plan if n not in files)
    if unexpected or missing:
        raise ValueError(f"checkpoint {path!r} ({layout} layout) does not match its config.json: "
                         f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected tensors "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    by_shard = {}
    for name, file in files.items():
        if name in plan:
            by_shard.setdefault(file, []).append(name)
    for file, names in by_shard.items():
        with safe_open(file, framework="pt") as f:
            for name in names:
                tensor = f.get_tensor(name)
                entry = plan[name]
                if tuple(tensor.shape) != entry.shape:
                    raise ValueError(f"checkpoint tensor {name!r} has shape {list(tensor.shape)}, the config needs "
                                     f"{list(entry.shape)}")
                for part in entry.parts:
                    dst = targets[part.ours][part.our_index]
                    dst.copy_(tensor[part.ckpt_index].reshape(dst.shape))
    return model.eval()


@torch.no_grad()
def checkpoint_tensors(model, layout: str = "moonshot") -> dict:
    """``{checkpoint name: tensor}`` of ``model`` in ``layout`` (contiguous CPU copies)."""
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    out = {}
    for name, entry in checkpoint_plan(model, layout).items():
        if len(entry.parts) == 1 and not entry.parts[0].ckpt_index:
            part = entry.parts[0]
            out[name] = state[part.ours][part.our_index].detach().reshape(entry.shape).cpu().contiguous()
            continue
        first = state[entry.parts[0].ours]
        t = torch.empty(entry.shape, dtype=first.dtype)
        for part in entry.parts:
            dst = t[part.ckpt_index]
            dst.copy_(state[part.ours][part.our_index].reshape(dst.shape))
        out[name] = t
    return out


def save_pretrained(model, folder: str, *, layout: str = "moonshot", max_shard_bytes: int = 5 << 30) -> list:
    """Write ``folder/config.json``, ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes``
    and ``model.safetensors.index.json``.  Returns the shard paths."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    model.config.save_pretrained(folder)
    tensors = checkpoint_tensors(model, layout)
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    weight_map, paths = {}, []
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        paths.append(os.path.join(folder, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return paths
