"""Kimi Linear checkpoints and configs (kda_compile.checkpoint, kda_compile.kimi_config), the MoE router against a
direct per-token implementation, the MLA shared key part against a hand-written attention, and every documented
way to build a HybridConfig."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from kda_compile.checkpoint import checkpoint_tensors, detect_layout
from kda_compile.model import HybridCache, HybridConfig, HybridModel
from kda_compile.moe import MoE, route

from kda_inputs import one_cpu_thread, rel_err  # noqa: F401  (autouse fixture)


def kimi_model(seed=0, dtype=torch.float32, **overrides) -> HybridModel:
    torch.manual_seed(seed)
    model = HybridModel(HybridConfig.tiny_kimi(**overrides)).to(dtype).eval()
    with torch.no_grad():  # a non-zero score-correction bias, so that its use is tested
        for block in model.blocks:
            if isinstance(block.mlp, MoE):
                block.mlp.e_score_correction_bias.normal_(0, 0.05)
    return model


def ids(B=2, T=21, seed=1):
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- configs

def test_every_documented_config_builds_a_model(tmp_path):
    """The class defaults (on the meta device: 1B+ parameters), the presets, JSON and Kimi's config.json."""
    with torch.device("meta"):
        default = HybridModel(HybridConfig())
    assert default.blocks[3].mixer.H == HybridConfig().num_heads          # the derived mla_heads
    with torch.device("meta"):
        HybridModel(HybridConfig(num_experts=4, num_experts_per_token=2))
    for cfg in (HybridConfig.tiny(), HybridConfig.tiny_kimi(), HybridConfig.tiny().full_attention(),
                HybridConfig.tiny(mla_num_heads=4), HybridConfig.from_json(HybridConfig.tiny_kimi().to_json())):
        out = HybridModel(cfg).eval()(ids(1, 5))
        assert out.shape == (1, 5, cfg.vocab_size) and torch.isfinite(out).all()
    cfg = HybridConfig.tiny_kimi()
    cfg.save_pretrained(str(tmp_path))
    assert HybridConfig.from_pretrained(str(tmp_path)) == cfg
    assert HybridConfig.from_kimi_dict(cfg.to_kimi_dict()) == cfg


def test_config_json_in_moonshot_format(tmp_path):
    cfg = HybridConfig.tiny_kimi()
    data = json.load(open(cfg.save_pretrained(str(tmp_path))))
    assert data["model_type"] == "kimi_linear"
    assert data["linear_attn_config"] == {"kda_layers": [1, 2, 4], "full_attn_layers": [3], "num_heads": 2,
                                          "head_dim": 16, "short_conv_kernel_size": 4}
    assert (data["qk_nope_head_dim"], data["qk_rope_head_dim"], data["v_head_dim"], data["mla_use_nope"]) == \
        (16, 8, 16, True)
    assert (data["num_experts"], data["num_experts_per_token"], data["num_shared_experts"],
            data["first_k_dense_replace"], data["moe_router_activation_func"]) == (8, 2, 1, 1, "sigmoid")
    assert data["q_lora_rank"] is None and data["pad_token_id"] == 0


def test_config_from_transformers_keys():
    """The keys transformers writes (layer_types, mlp_layer_types, linear_*, n_group, ...) read the same."""
    moonshot = HybridConfig.tiny_kimi().to_kimi_dict()
    hf = {k: v for k, v in moonshot.items() if k not in ("linear_attn_config", "first_k_dense_replace",
                                                          "num_experts", "num_expert_group",
                                                          "num_experts_per_token", "num_shared_experts")}
    hf.update(layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
              mlp_layer_types=["dense", "sparse", "sparse", "sparse"], linear_num_heads=2, linear_head_dim=16,
              linear_conv_kernel_dim=4, num_local_experts=8, n_group=2, num_experts_per_tok=2, n_shared_experts=1)
    assert HybridConfig.from_kimi_dict(hf) == HybridConfig.tiny_kimi()


def test_published_48b_config_shape():
    """The published 48B-A3B config (sizes only; no weights): 27 layers, 3:1 KDA:MLA, 256 experts top-8."""
    full = [4, 8, 12, 16, 20, 24, 27]
    data = {"model_type": "kimi_linear", "vocab_size": 163840, "hidden_size": 2304, "intermediate_size": 9216,
            "num_hidden_layers": 27, "num_attention_heads": 32, "num_key_value_heads": 32, "kv_lora_rank": 512,
            "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "mla_use_nope": True, "num_experts": 256, "num_experts_per_token": 8, "num_shared_experts": 1,
            "moe_intermediate_size": 1024, "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "moe_router_activation_func": "sigmoid", "moe_renormalize": True, "routed_scaling_factor": 2.446,
            "use_grouped_topk": True, "num_expert_group": 1, "topk_group": 1, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "bos_token_id": 163584,
            "linear_attn_config": {"kda_layers": [i for i in range(1, 28) if i not in full],
                                   "full_attn_layers": full, "num_heads": 32, "head_dim": 128,
                                   "short_conv_kernel_size": 4}}
    cfg = HybridConfig.from_kimi_dict(data)
    assert cfg.layer_types.count("mla") == 7 and cfg.layer_types[3] == "mla" and cfg.layer_types[26] == "mla"
    assert cfg.mlp_types == ["dense"] + ["moe"] * 26
    assert cfg.mla_cache_dim == 576 and cfg.extra_config == {"bos_token_id": 163584}
    with torch.device("meta"):
        model = HybridModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert 47e9 < total < 50e9, total


@pytest.mark.parametrize("change,match", [
    (dict(model_type="llama"), "model_type"), (dict(mla_use_nope=False), "mla_use_nope"),
    (dict(num_key_value_heads=1), "num_key_value_heads"),
    (dict(linear_attn_config={"kda_layers": [1, 2], "full_attn_layers": [3], "num_heads": 2, "head_dim": 16}),
     "kda_layers"), (dict(num_expert_group=3), "num_expert_group")])
def test_bad_config_json_names_the_key(change, match):
    data = HybridConfig.tiny_kimi().to_kimi_dict()
    data.update(change)
    with pytest.raises(ValueError, match=match):
        HybridConfig.from_kimi_dict(data)


def test_config_without_kimi_form_is_refused():
    with pytest.raises(ValueError, match="kda_output_gate_bias"):
        HybridConfig.tiny(gate_rank=16, mla_latent_norm_eps=1e-6).to_kimi_dict()
    with pytest.raises(ValueError, match="num_v_heads"):
        HybridConfig.tiny_kimi(num_v_heads=4).to_kimi_dict()


# ---------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("layout", ["moonshot", "transformers"])
@pytest.mark.parametrize("tie", [False, True])
def test_checkpoint_roundtrip_in_each_layout(tmp_path, layout, tie):
    model = kimi_model(tie_word_embeddings=tie)
    shards = model.save_pretrained(str(tmp_path), layout=layout, max_shard_bytes=60_000)
    assert len(shards) > 1 and os.path.isfile(tmp_path / "model.safetensors.index.json")
    index = json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"]
    assert detect_layout(index) == layout
    if layout == "moonshot":
        assert "model.layers.0.self_attn.q_conv1d.weight" in index
        assert "model.layers.1.block_sparse_moe.experts.7.w3.weight" in index
        assert "model.layers.1.block_sparse_moe.gate.e_score_correction_bias" in index
        assert "model.layers.0.mlp.gate_proj.weight" in index           # layer 0: dense
    else:
        assert "model.layers.0.self_attn.conv1d.weight" in index
        assert "model.layers.0.self_attn.forget_gate.A_log" in index
        assert "model.layers.1.mlp.experts.gate_up_proj" in index
    assert ("lm_head.weight" in index) != tie
    loaded = HybridModel.from_pretrained(str(tmp_path))
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(ids()), model(ids()))
    if tie:
        assert loaded.lm_head.weight is loaded.embed.weight


def test_published_tensor_shapes(tmp_path):
    tensors = checkpoint_tensors(kimi_model(), "moonshot")
    assert tensors["model.layers.0.self_attn.A_log"].shape == (1, 1, 2, 1)
    assert tensors["model.layers.0.self_attn.dt_bias"].shape == (32,)
    assert tensors["model.layers.0.self_attn.q_conv1d.weight"].shape == (32, 1, 4)
    assert tensors["model.layers.2.self_attn.kv_a_proj_with_mqa.weight"].shape == (24 + 8, 64)
    assert tensors["model.layers.2.self_attn.q_proj.weight"].shape == (2 * (16 + 8), 64)
    assert "model.layers.0.self_attn.g_b_proj.bias" not in tensors
    assert tensors["model.layers.3.block_sparse_moe.experts.0.w2.weight"].shape == (64, 32)
    assert tensors["model.layers.3.block_sparse_moe.gate.weight"].dtype == torch.float32


def _rewrite(folder, edit):
    """Apply ``edit(dict of tensors)`` to a one-shard checkpoint."""
    from safetensors.torch import load_file, save_file
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    shard = os.path.join(folder, next(iter(index["weight_map"].values())))
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)
    index["weight_map"] = {name: os.path.basename(shard) for name in tensors}
    json.dump(index, open(os.path.join(folder, "model.safetensors.index.json"), "w"))


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w1.weight"), r"missing tensors \['model.layers.1"),
    (lambda t: t.update({"model.layers.0.self_attn.g_b_proj.bias": torch.zeros(32)}), "unexpected tensors"),
    (lambda t: t.update({"model.layers.2.self_attn.kv_a_proj_with_mqa.weight": torch.zeros(24, 64)}),
     r"kv_a_proj_with_mqa.weight' has shape \[24, 64\], the config needs \[32, 64\]")])
def test_missing_extra_and_wrong_shape_tensors_are_named(tmp_path, edit, match):
    kimi_model().save_pretrained(str(tmp_path))
    _rewrite(str(tmp_path), edit)
    with pytest.raises(ValueError, match=match):
        HybridModel.from_pretrained(str(tmp_path))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HybridModel.from_pretrained(str(tmp_path))
    HybridConfig.tiny_kimi().save_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        HybridModel.from_pretrained(str(tmp_path))


def test_bf16_load_keeps_router_and_gate_parameters_float32(tmp_path):
    kimi_model().save_pretrained(str(tmp_path))
    model = HybridModel.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.blocks[0].mixer.dt_bias.dtype == torch.float32 and model.blocks[1].mlp.router.weight.dtype == \
        torch.float32 and model.blocks[1].mlp.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(ids()).float()).all()


# ----------------------------------------------------------------------------------------------- MoE

def route_by_hand(x, weight, bias, top_k, groups, topk_group, renormalize, scaling):
    """Token by token, with Python sorting (no topk): sigmoid scores, group score = sum of the group's two best
    choice scores, keep the topk_group best groups, pick the top_k best experts among them."""
    E = weight.shape[0]
    per = E // groups
    out_w, out_i = [], []
    for row in x.double():
        s = torch.sigmoid(weight.double() @ row)
        c = s + bias.double()
        gscore = [sorted(c[g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(groups)]
        keep = sorted(range(groups), key=lambda g: -sum(gscore[g]))[:topk_group]
        eligible = [e for e in range(E) if e // per in keep]
        chosen = sorted(eligible, key=lambda e: -c[e].item())[:top_k]
        w = s[chosen]
        if renormalize:
            w = w / w.sum()
        out_w.append(w * scaling)
        out_i.append(chosen)
    return torch.stack(out_w), torch.tensor(out_i)


@pytest.mark.parametrize("E,k,groups,topk_group,renorm", [(8, 2, 1, 1, True), (8, 2, 4, 2, True),
                                                          (16, 3, 4, 1, False), (6, 6, 2, 2, True)])
def test_router_matches_direct_implementation(E, k, groups, topk_group, renorm):
    gen = torch.Generator().manual_seed(E + k + groups)
    x, weight = torch.randn(40, 12, generator=gen), torch.randn(E, 12, generator=gen)
    bias = torch.randn(E, generator=gen) * 0.1            # continuous draws: no exact ties
    w, i = route(x, weight, bias, k, num_groups=groups, topk_group=topk_group, renormalize=renorm, scaling=2.5)
    ref_w, ref_i = route_by_hand(x, weight, bias, k, groups, topk_group, renorm, 2.5)
    order = i.sort(-1).indices                           # topk's order is unspecified: compare as sets
    ref_order = ref_i.sort(-1).indices
    assert torch.equal(i.gather(1, order), ref_i.gather(1, ref_order))
    assert rel_err(w.gather(1, order), ref_w.gather(1, ref_order)) < 1e-6


@pytest.mark.parametrize("T", [1, 9])
def test_expert_forms_agree_and_match_a_per_token_loop(T):
    moe = kimi_model().blocks[1].mlp
    x = torch.randn(2, T, 64)
    with torch.no_grad():
        w, idx = route(x.reshape(-1, 64), moe.router.weight, moe.e_score_correction_bias, moe.top_k,
                       **moe.router_options)
        ref = []
        for n, row in enumerate(x.reshape(-1, 64)):
            y = moe.shared(row)
            for j in range(moe.top_k):
                e = idx[n, j]
                y = y + w[n, j] * (F.silu(moe.w_gate[e] @ row) * (moe.w_up[e] @ row)) @ moe.w_down[e].T
            ref.append(y)
        ref = torch.stack(ref).reshape(x.shape)
        for impl in ("loop", "gather", "dense"):
            moe.impl = impl
            assert rel_err(moe(x), ref) < 1e-6, impl


# ------------------------------------------------------------------------------------ MLA shared key

@pytest.mark.parametrize("P,T", [(0, 19), (0, 1), (6, 1), (5, 7)])
def test_mla_shared_key_part_matches_hand_written_attention(P, T):
    layer = kimi_model(dtype=torch.float64).blocks[2].mixer
    assert layer.dr == 8
    x = torch.randn(2, T, 64, dtype=torch.float64)
    prefix = torch.randn(2, P, 24 + 8, dtype=torch.float64)
    with torch.no_grad():
        y, cache = layer(x, prefix)
        kv = layer.kv_a_proj(x)
        c = kv[..., :24] / (kv[..., :24].pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * layer.kv_a_norm.weight
        lat = torch.cat([prefix, torch.cat([c, kv[..., 24:]], -1)], 1)
        k_nope, v = layer.kv_b_proj(lat[..., :24]).reshape(2, P + T, 2, 32).split([16, 16], -1)
        q = layer.q_proj(x).reshape(2, T, 2, 24)
        out = []
        for i in range(T):
            s = (torch.einsum("bhd,bjhd->bhj", q[:, i, :, :16], k_nope[:, :P + i + 1])
                 + torch.einsum("bhd,bjd->bhj", q[:, i, :, 16:], lat[:, :P + i + 1, 24:])) / 24 ** 0.5
            out.append(torch.einsum("bhj,bjhd->bhd", s.softmax(-1), v[:, :P + i + 1]))
        ref = layer.o_proj(torch.stack(out, 1).reshape(2, T, -1))
    assert rel_err(y, ref) < 1e-12 and rel_err(cache, lat) < 1e-14


def test_kimi_cached_decode_equals_recompute():
    model = kimi_model(dtype=torch.float64)
    seq = ids(2, 30)
    with torch.no_grad():
        full = model(seq)
        logits, cache = model.forward_cached(seq[:, :14], None)
        steps = [logits]
        for t in range(14, 30):
            logits, cache = model.forward_cached(seq[:, t:t + 1], cache)
            steps.append(logits)
    assert rel_err(torch.cat(steps, 1), full) < 1e-10
    assert cache.layers[2][0].shape == (2, 30, 32)
    assert HybridCache.empty(model.config, 1).layers[2][0].shape == (1, 0, 32)


def test_kimi_demo_step_says_when_transformers_is_missing(monkeypatch, capsys):
    from kda_compile import demo_kimi
    monkeypatch.setattr(demo_kimi, "_transformers_kimi",
                        lambda: (None, "transformers is not installed (pip install 'kda_compile[transformers]')"))
    assert demo_kimi.run_kimi_demo(prompt_len=8, new_tokens=2) == {"ok": True, "transformers": False}
    assert "transformers step skipped: transformers is not installed" in capsys.readouterr().out
