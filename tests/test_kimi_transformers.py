"""Parity with transformers' KimiLinearForCausalLM (the optional extra ``kda_compile[transformers]``): the same
tiny random checkpoint, loaded by both, gives the same logits for prefill and 16 cached decode steps and the same
greedy tokens; transformers' own KDA routed to kda_compile (kda_compile.integrations.transformers) too."""
import pytest
import torch

import kda_compile.api as kda_api
from kda_compile.model import HybridConfig, HybridModel
from kda_compile.moe import MoE

from kda_inputs import one_cpu_thread, rel_err  # noqa: F401  (autouse fixture)

transformers = pytest.importorskip("transformers", reason="transformers is the optional extra "
                                                          "kda_compile[transformers]; not installed here")
try:
    from transformers import KimiLinearForCausalLM
except ImportError:  # pragma: no cover - an older transformers
    pytest.skip(f"transformers {transformers.__version__} has no KimiLinearForCausalLM (needs >= 5.24)",
                allow_module_level=True)

from kda_compile.integrations import transformers as integration  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module", params=["moonshot", "transformers"])
def checkpoint(request, tmp_path_factory):
    """(folder, our model) of a tiny random Kimi Linear checkpoint: both layer kinds, MoE with 8 experts in 2
    groups, a shared expert, a dense first layer, a non-zero score-correction bias."""
    torch.manual_seed(0)
    model = HybridModel(HybridConfig.tiny_kimi()).eval()
    with torch.no_grad():
        for block in model.blocks:
            if isinstance(block.mlp, MoE):
                block.mlp.e_score_correction_bias.normal_(0, 0.05)
            if block.kind == "kda":  # livelier gates than the init (decays far from 0 and 1)
                block.mixer.A_log.normal_(0, 0.5)
    folder = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(folder, layout=request.param, max_shard_bytes=80_000)
    return folder, HybridModel.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    transformers.logging.set_verbosity_error()
    return KimiLinearForCausalLM.from_pretrained(checkpoint[0], dtype=torch.float32).eval()


def prompt(B=2, T=37, seed=3):
    return torch.randint(3, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf_prefill_and_decode(hf, ids, steps):
    out = hf(ids[:, :-steps], use_cache=True)
    logits, cache = [out.logits], out.cache
    for t in range(ids.shape[1] - steps, ids.shape[1]):
        out = hf(ids[:, t:t + 1], cache=cache, use_cache=True)
        logits.append(out.logits)
        cache = out.cache
    return torch.cat(logits, 1)


def _ours_prefill_and_decode(model, ids, steps):
    logits, cache = model.forward_cached(ids[:, :-steps], None)
    out = [logits]
    for t in range(ids.shape[1] - steps, ids.shape[1]):
        logits, cache = model.forward_cached(ids[:, t:t + 1], cache)
        out.append(logits)
    return torch.cat(out, 1)


@torch.no_grad()
def test_transformers_loads_our_checkpoint_completely(checkpoint, hf_model):
    """transformers filled every parameter from the file (none left at its random init)."""
    ours = HybridModel.from_pretrained(checkpoint[0])
    hf = dict(hf_model.named_parameters())
    assert torch.equal(hf["model.layers.0.self_attn.conv1d.weight"][:, 0], ours.blocks[0].mixer.conv_weight)
    w = hf["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(w[:, :32], ours.blocks[1].mlp.w_gate) and torch.equal(w[:, 32:], ours.blocks[1].mlp.w_up)
    assert torch.equal(hf["model.layers.0.self_attn.forget_gate.A_log"].flatten(), ours.blocks[0].mixer.A_log)


@torch.no_grad()
def test_prefill_logits_match_transformers(checkpoint, hf_model):
    ids = prompt()
    err = rel_err(checkpoint[1](ids), hf_model(ids).logits)
    assert err < TOL, err


@torch.no_grad()
def test_16_cached_decode_steps_match_transformers(checkpoint, hf_model):
    ids = prompt(T=40)
    ours, ref = _ours_prefill_and_decode(checkpoint[1], ids, 16), _hf_prefill_and_decode(hf_model, ids, 16)
    assert ours.shape == ref.shape == (2, 40, 128)
    err = rel_err(ours[:, -16:], ref[:, -16:])
    assert err < TOL, err


@torch.no_grad()
def test_greedy_generate_matches_transformers(checkpoint, hf_model):
    ids = prompt(T=11)
    ref = hf_model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(checkpoint[1].generate(ids, 16), ref)


@torch.no_grad()
def test_transformers_with_kda_compile_kernels(checkpoint, hf_model, monkeypatch):
    """enable(): transformers' KDA calls go to kda_compile (counted), the logits stay, and disable() restores."""
    calls = {"chunk": 0, "recurrent": 0}
    chunk, recurrent = kda_api.chunk_kda, kda_api.fused_recurrent_kda

    def counting_chunk(*a, **k):
        calls["chunk"] += 1
        return chunk(*a, **k)

    def counting_recurrent(*a, **k):
        calls["recurrent"] += 1
        return recurrent(*a, **k)

    monkeypatch.setattr(kda_api, "chunk_kda", counting_chunk)
    monkeypatch.setattr(kda_api, "fused_recurrent_kda", counting_recurrent)
    ids = prompt(T=40)
    ref = _hf_prefill_and_decode(hf_model, ids, 16)
    assert calls == {"chunk": 0, "recurrent": 0} and not integration.is_enabled()
    with integration.use_kda_compile(backend="reference"):
        assert integration.is_enabled()
        out = _hf_prefill_and_decode(hf_model, ids, 16)
        tokens = hf_model.generate(ids[:, :11], max_new_tokens=8, do_sample=False)
    assert not integration.is_enabled()
    n_kda = checkpoint[1].config.layer_types.count("kda")
    assert calls["chunk"] >= n_kda and calls["recurrent"] >= 16 * n_kda
    assert rel_err(out, ref) < TOL
    assert torch.equal(tokens, checkpoint[1].generate(ids[:, :11], 8))


def test_integration_reports_the_fallback_and_rejects_bad_backend():
    assert integration.fallback_implementation() in ("fla", "pytorch")
    with pytest.raises(TypeError, match="backend"):
        integration.enable(backend=3)
    assert not integration.is_enabled()
