"""The hybrid KDA/MLA model (kda_compile.model): layers against independent float64 re-derivations, the cache
(decode == recompute, prefill in pieces == at once, no mutation, flatten order), generate, save/load, checks."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import kda_compile.api as kda_api
from kda_compile.model import HybridCache, HybridConfig, HybridModel

from kda_inputs import one_cpu_thread, rel_err  # noqa: F401  (autouse fixture)

GVA = dict(num_heads=2, num_v_heads=4)   # grouped value heads: value head h uses key head h // 2




def make_model(dtype=torch.float64, seed=0, **overrides) -> HybridModel:
    torch.manual_seed(seed)
    return HybridModel(HybridConfig.tiny(**overrides)).to(dtype).eval()


def tokens(B, T, vocab=128):
    return torch.randint(0, vocab, (B, T))


# ------------------------------------------------------------------------------- independent references

def kda_layer_by_hand(layer, x, conv_state=None, state=None, live=False):
    """The KDA layer written out token by token in float64, without kda_compile's reference or ops:
    projections, causal conv as an explicit window sum, SiLU, L2 norm, gate, sigmoid beta, the delta-rule
    recurrence of docs/algorithm.md, gated RMSNorm, output projection.  ``live``: keep autograd to the
    layer's (float64) parameters."""
    P = {n: (t if live else t.detach()).double() for n, t in layer.named_parameters()}
    x = x.double()
    B, T, _ = x.shape
    H, HV, K, V, W = layer.H, layer.HV, layer.K, layer.V, layer.conv_size
    qkv = torch.cat([x @ P["q_proj.weight"].T, x @ P["k_proj.weight"].T, x @ P["v_proj.weight"].T], -1)
    C = qkv.shape[-1]
    past = torch.zeros(B, W - 1, C, dtype=x.dtype) if conv_state is None else conv_state.double().transpose(1, 2)
    hist = torch.cat([past, qkv], 1)                                   # [B, W - 1 + T, C]
    conv = torch.stack([sum(hist[:, t + j] * P["conv_weight"][:, j] for j in range(W)) for t in range(T)], 1)
    q, k, v = F.silu(conv).split([H * K, H * K, HV * V], -1)
    q, k, v = q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, HV, V)
    q, k = q / (q.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt(), k / (k.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
    f = (x @ P["f_proj.0.weight"].T @ P["f_proj.1.weight"].T).reshape(B, T, HV, K)
    g = -P["A_log"].exp()[:, None] * F.softplus(f + P["dt_bias"].reshape(HV, K))
    beta = torch.sigmoid(x @ P["b_proj.weight"].T)
    S0 = torch.zeros(B, HV, K, V, dtype=x.dtype) if state is None else state.double()
    heads = []
    for h in range(HV):
        kh, S, out = h // (HV // H), S0[:, h], []
        for t in range(T):
            S = S * g[:, t, h].exp()[:, :, None]
            u = v[:, t, h] - torch.einsum("bkv,bk->bv", S, k[:, t, kh])
            S = S + beta[:, t, h, None, None] * k[:, t, kh, :, None] * u[:, None, :]
            out.append(K ** -0.5 * torch.einsum("bkv,bk->bv", S, q[:, t, kh]))
        heads.append((torch.stack(out, 1), S))
    o = torch.stack([h[0] for h in heads], 2)                          # [B, T, HV, V]
    S = torch.stack([h[1] for h in heads], 1)                          # [B, HV, K, V]
    gate = (x @ P["g_proj.0.weight"].T @ P["g_proj.1.weight"].T + P["g_proj.1.bias"]).reshape(B, T, HV, V)
    o = o / (o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps).sqrt() * P["o_norm.weight"] * torch.sigmoid(gate)
    return o.reshape(B, T, HV * V) @ P["o_proj.weight"].T, hist[:, T:].transpose(1, 2), S


def mla_layer_by_hand(layer, x, latent_prefix=None):
    """MLA written out per query position with an explicit softmax over the visible keys, float64."""
    layer = layer.double()
    x = x.double()
    B, T, _ = x.shape
    c = layer.kv_a_norm(layer.kv_a_proj(x))
    lat = c if latent_prefix is None else torch.cat([latent_prefix.double(), c], 1)
    P = lat.shape[1] - T
    k, v = layer.kv_b_proj(lat).reshape(B, -1, layer.H, layer.dk + layer.dv).split([layer.dk, layer.dv], -1)
    q = layer.q_proj(x).reshape(B, T, layer.H, layer.dk)
    out = []
    for i in range(T):
        s = torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, :P + i + 1]) / layer.dk ** 0.5
        out.append(torch.einsum("bhj,bjhd->bhd", s.softmax(-1), v[:, :P + i + 1]))
    return layer.o_proj(torch.stack(out, 1).reshape(B, T, -1)), lat


# ---------------------------------------------------------------------------------------------- layers

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads", [dict(), GVA], ids=["H=HV", "GVA"])
@pytest.mark.parametrize("T,with_cache", [(45, False), (45, True), (1, True), (2, True)])
def test_kda_layer_matches_hand_written_recurrence(dtype, tol, heads, T, with_cache):
    model = make_model(dtype, seed=1, **heads)
    layer = model.blocks[0].mixer
    x = torch.randn(2, T, model.config.hidden_size).to(dtype)
    conv_state = state = None
    if with_cache:
        conv_state = torch.randn(2, layer.conv_channels, layer.conv_size - 1).to(dtype)
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        state = torch.randn(2, layer.HV, layer.K, layer.V, dtype=state_dtype)
    with torch.no_grad():
        y, new_conv, new_state = layer(x, conv_state, state)
    ref_y, ref_conv, ref_state = kda_layer_by_hand(layer, x, conv_state, state)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, ref_y) < tol
    assert rel_err(new_conv, ref_conv) < tol and rel_err(new_state, ref_state) < tol
    assert new_state.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("P,T", [(0, 37), (0, 1), (5, 1), (30, 1), (9, 13)])
def test_mla_layer_matches_hand_written_attention(dtype, tol, P, T):
    model = make_model(dtype, seed=2)
    layer = model.blocks[3].mixer
    assert model.config.layer_types[3] == "mla"
    x = torch.randn(2, T, model.config.hidden_size).to(dtype)
    prefix = torch.randn(2, P, layer.rank).to(dtype)
    with torch.no_grad():
        y, lat = layer(x, prefix)
    ref_y, ref_lat = mla_layer_by_hand(layer, x, prefix)
    assert lat.shape == (2, P + T, layer.rank)
    assert rel_err(y, ref_y) < tol and rel_err(lat, ref_lat) < tol


def test_kda_layer_gradients_match_hand_written_recurrence():
    model = make_model(torch.float64, seed=3, **GVA)
    layer = model.blocks[1].mixer
    x = torch.randn(1, 21, model.config.hidden_size, dtype=torch.float64)
    w = torch.randn(1, 21, model.config.hidden_size, dtype=torch.float64)
    (layer(x)[0] * w).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    params = dict(layer.named_parameters())
    ref = torch.autograd.grad((kda_layer_by_hand(layer, x, live=True)[0] * w).sum(), list(params.values()))
    for name, r in zip(params, ref):
        assert rel_err(got[name], r) < 1e-8, name


# ----------------------------------------------------------------------------------------------- cache

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("overrides", [dict(), GVA, dict(q_lora_rank=None, conv_size=2, chunk_size=32)],
                         ids=["tiny", "GVA", "variant"])
def test_cached_decode_equals_recompute(dtype, tol, overrides):
    model = make_model(dtype, **overrides)
    ids = tokens(2, 45)
    with torch.no_grad():
        full = model(ids)
        logits, cache = model.forward_cached(ids[:, :37], None)        # ragged prefill (not a chunk multiple)
        steps = [logits]
        for t in range(37, 45):
            logits, cache = model.forward_cached(ids[:, t:t + 1], cache)
            steps.append(logits)
    assert cache.seq_len == 45
    for t in range(37, 45):
        assert rel_err(steps[t - 36][:, 0], full[:, t]) < tol, t
    assert rel_err(torch.cat(steps, 1), full) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("split", [1, 2, 20, 64, 69])
def test_prefill_in_two_pieces_equals_one(dtype, tol, split):
    model = make_model(dtype, seed=4)
    ids = tokens(2, 70)
    with torch.no_grad():
        one, cache_one = model.forward_cached(ids, None)
        a, cache_a = model.forward_cached(ids[:, :split], None)
        b, cache_b = model.forward_cached(ids[:, split:], cache_a)
    assert rel_err(torch.cat([a, b], 1), one) < tol
    for name, x, y in zip(HybridCache.tensor_names(model.config), cache_b.flatten(), cache_one.flatten()):
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert rel_err(x, y) < tol, name


def test_empty_cache_equals_no_cache():
    model = make_model(torch.float64)
    ids = tokens(3, 19)
    with torch.no_grad():
        a, ca = model.forward_cached(ids, None)
        b, cb = model.forward_cached(ids, HybridCache.empty(model.config, 3, dtype=torch.float64))
    assert rel_err(a, b) < 1e-12
    assert all(rel_err(x, y) < 1e-12 for x, y in zip(ca.flatten(), cb.flatten()))


@pytest.mark.parametrize("T", [1, 9])
def test_cached_forward_does_not_mutate_its_cache(T):
    model = make_model(torch.float32)
    with torch.no_grad():
        _, cache = model.forward_cached(tokens(2, 11), None)
        before = [t.clone() for t in cache.flatten()]
        _, new = model.forward_cached(tokens(2, T), cache)
    for x, y in zip(cache.flatten(), before):
        assert torch.equal(x, y)
    assert new.seq_len == 11 + T and cache.seq_len == 11


def test_prefill_uses_chunk_op_and_decode_uses_recurrent_op(monkeypatch):
    calls = []
    for name in ("chunk_kda", "fused_recurrent_kda"):
        real = getattr(kda_api, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, args[0].shape[1], kwargs["use_qk_l2norm_in_kernel"], kwargs["use_gate_in_kernel"],
                          kwargs["use_beta_sigmoid_in_kernel"]))
            return _real(*args, **kwargs)
        monkeypatch.setattr(kda_api, name, spy)
    model = make_model(torch.float32)
    n_kda = model.config.layer_types.count("kda")
    with torch.no_grad():
        _, cache = model.forward_cached(tokens(1, 8), None)
        assert calls == [("chunk_kda", 8, True, True, True)] * n_kda
        calls.clear()
        model.forward_cached(tokens(1, 1), cache)
        assert calls == [("fused_recurrent_kda", 1, True, True, True)] * n_kda


def test_cache_layout_flatten_unflatten_and_names():
    cfg = HybridConfig.tiny(num_layers=6, mla_layers=(1, 4))
    assert cfg.layer_types == ["kda", "mla", "kda", "kda", "mla", "kda"]
    cache = HybridCache.empty(cfg, 3, dtype=torch.bfloat16)
    names = HybridCache.tensor_names(cfg)
    flat = cache.flatten()
    assert len(names) == len(flat) == 4 * 2 + 2 and len(set(names)) == len(names)
    assert names[:3] == ["layer0_conv_state", "layer0_recurrent_state", "layer1_latent_kv"]
    for name, t in zip(names, flat):
        if name.endswith("conv_state"):
            assert t.shape == (3, cfg.conv_channels, cfg.conv_size - 1) and t.dtype == torch.bfloat16
        elif name.endswith("recurrent_state"):
            assert t.shape == (3, cfg.kda_num_v_heads, cfg.head_dim, cfg.v_head_dim) and t.dtype == torch.float32
        else:
            assert t.shape == (3, 0, cfg.kv_lora_rank) and t.dtype == torch.bfloat16
    again = HybridCache.unflatten(cfg, [t + 1 for t in flat])
    assert all(torch.equal(x, y + 1) for x, y in zip(again.flatten(), flat))
    assert HybridCache.tensor_names(cfg, "past_")[0] == "past_layer0_conv_state"
    leaves, spec = torch.utils._pytree.tree_flatten(cache)
    assert len(leaves) == len(flat)
    assert isinstance(torch.utils._pytree.tree_unflatten(leaves, spec), HybridCache)
    with pytest.raises(ValueError, match="needs 10 tensors"):
        HybridCache.unflatten(cfg, flat[:-1])


def test_causality_and_batch_invariance():
    model = make_model(torch.float64, seed=5)
    ids = tokens(3, 40)
    with torch.no_grad():
        base = model(ids)
        changed = ids.clone()
        changed[:, 25] = (changed[:, 25] + 1) % 128
        other = model(changed)
        alone = model(ids[1:2])
    assert rel_err(other[:, :25], base[:, :25]) < 1e-13
    assert rel_err(other[:, 25:], base[:, 25:]) > 1e-4                 # the change is visible afterwards
    assert rel_err(alone, base[1:2]) < 1e-12


def test_training_step_gives_finite_gradients_everywhere():
    model = make_model(torch.float32).train()
    ids = tokens(2, 33)
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# -------------------------------------------------------------------------------------------- generate

def test_generate_greedy_equals_recompute_loop():
    model = make_model(torch.float64, seed=6)
    prompt = tokens(2, 13)
    out = model.generate(prompt, max_new_tokens=10)
    ref = prompt
    with torch.no_grad():
        for _ in range(10):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.shape == (2, 23) and torch.equal(out, ref)


def test_generate_sampling_is_seeded_and_eos_stops():
    model = make_model(torch.float32, seed=7)
    prompt = tokens(2, 5)
    a = model.generate(prompt, 8, greedy=False, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 8, greedy=False, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 13)
    first = model.generate(prompt, 1)[:, -1]
    stop = model.generate(prompt[:1], 8, eos_token_id=int(first[0]))
    assert stop.shape == (1, 6)
    assert torch.equal(model.generate(prompt, 0), prompt)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)


# ----------------------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("tie", [False, True])
def test_save_load_roundtrip_with_safetensors(tmp_path, tie):
    model = make_model(torch.float32, tie_word_embeddings=tie, num_v_heads=4)
    path = str(tmp_path / "model.safetensors")
    model.save(path)
    with open(path, "rb") as f:
        assert b"pickle" not in f.read(4096)
    loaded = HybridModel.load(path).eval()
    assert loaded.config == model.config
    ids = tokens(2, 17)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    if tie:
        assert loaded.lm_head.weight is loaded.embed.weight
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not written by HybridModel.save"):
        HybridModel.load(str(tmp_path / "other.safetensors"))


# ------------------------------------------------------------------------------------------ bad inputs

def test_bad_inputs_raise_clear_errors():
    model = make_model(torch.float32)
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"input_ids must have shape \[B, T\]"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="T >= 1"):
        model(torch.zeros(1, 0, dtype=torch.long))
    cache = HybridCache.empty(model.config, 2)
    with pytest.raises(ValueError, match="batch size 3"):
        model.forward_cached(tokens(3, 1), cache)
    with pytest.raises(TypeError, match="HybridCache"):
        model.forward_cached(tokens(2, 1), cache.flatten())
    with pytest.raises(TypeError, match="HybridConfig"):
        HybridModel({"hidden_size": 8})


@pytest.mark.parametrize("field,value,match", [
    ("hidden_size", 0, "hidden_size"), ("num_v_heads", 3, "num_v_heads"), ("chunk_size", 16, "chunk_size"),
    ("mla_layers", (7,), "mla_layers"), ("conv_size", 1.5, "conv_size")])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        HybridConfig.tiny(**{field: value})


def test_config_presets_and_json():
    cfg = HybridConfig()
    assert cfg.layer_types.count("mla") == 6 and cfg.layer_types[3] == "mla" and cfg.layer_types[0] == "kda"
    full = cfg.full_attention()
    assert full.layer_types == ["mla"] * cfg.num_layers
    tiny = HybridConfig.tiny(mla_layers=[0, 2])
    assert HybridConfig.from_json(tiny.to_json()) == tiny
    with pytest.raises(ValueError, match="unknown HybridConfig fields"):
        HybridConfig.from_json('{"hidden": 3}')
    assert dataclasses.replace(tiny, num_layers=8).layer_types.count("mla") == 2


# ------------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_cuda_model_matches_float64_cpu_and_its_own_recompute(dtype, tol):
    """On the GPU the dispatch may pick fast kernels: the model must still equal the float64 CPU model, and
    cached decoding its own full recompute."""
    ref_model = make_model(torch.float64, seed=8, **GVA)
    model = make_model(torch.float64, seed=8, **GVA).to(device="cuda", dtype=dtype)
    ids = tokens(2, 150)
    with torch.no_grad():
        ref = ref_model(ids)
        full = model(ids.cuda())
        assert rel_err(full.cpu(), ref) < tol
        logits, cache = model.forward_cached(ids[:, :141].cuda(), None)
        steps = [logits]
        for t in range(141, 150):
            logits, cache = model.forward_cached(ids[:, t:t + 1].cuda(), cache)
            steps.append(logits)
    assert rel_err(torch.cat(steps, 1).cpu(), ref) < tol
