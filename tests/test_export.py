"""ONNX export of the hybrid model: prefill.onnx / decode.onnx pass onnx.checker, hold one
kda_compile::KDA node per KDA layer, run unmodified in onnxruntime and match PyTorch in float32 (prefill, then
16 decode steps from the prefill cache), with both function bodies; the runner names wrong inputs; the CLI
and the demo step work.  Exports are slow, so each body is exported once per module."""
import dataclasses
import os

import numpy as np
import onnx
import pytest
import torch

from kda_compile.export import OnnxHybridRunner, attach_kda_function, export_hybrid
from kda_compile.export.__main__ import main as cli_main
from kda_compile.export.parity import compare, max_rel_err
from kda_compile.model import KDA, HybridCache, HybridConfig, HybridModel

TOL = 1e-4  # max relative error in float32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HybridModel(HybridConfig.tiny()).eval()


@pytest.fixture(scope="module")
def loop_export(model, tmp_path_factory):
    return export_hybrid(model, str(tmp_path_factory.mktemp("onnx_loop")), body="loop")


@pytest.fixture(scope="module", params=["loop", "linear_attention"])
def exported(request, loop_export, tmp_path_factory):
    """(paths, runner) per body.  The linear_attention graphs are the loop graphs with the other function body
    attached (export_hybrid(body=...) does exactly that after the same export), which saves an export."""
    if request.param == "loop":
        return loop_export, OnnxHybridRunner(os.path.dirname(loop_export.prefill))
    out = str(tmp_path_factory.mktemp("onnx_linear_attention"))
    for name in ("prefill", "decode"):
        proto = attach_kda_function(onnx.load(getattr(loop_export, name)), "linear_attention")
        onnx.save(proto, os.path.join(out, f"{name}.onnx"))
    paths = dataclasses.replace(loop_export, prefill=os.path.join(out, "prefill.onnx"),
                                decode=os.path.join(out, "decode.onnx"), body="linear_attention")
    return paths, OnnxHybridRunner(out)


def test_graphs_pass_checker_and_hold_one_node_per_kda_layer(exported, model):
    paths, _ = exported
    n_kda = model.config.layer_types.count(KDA)
    for path in (paths.prefill, paths.decode):
        onnx.checker.check_model(path, full_check=True)
        proto = onnx.load(path)
        custom = [n for n in proto.graph.node if n.domain not in ("", "ai.onnx")]
        assert len(custom) == n_kda and all((n.domain, n.op_type) == ("kda_compile", "KDA") for n in custom)
        assert {(o.domain, o.version) for o in proto.opset_import} >= {("kda_compile", 1)}
        (fn,) = [f for f in proto.functions if (f.domain, f.name) == ("kda_compile", "KDA")]
        assert ("Loop" if paths.body == "loop" else "LinearAttention") in {n.op_type for n in fn.node}


def test_axes_are_dynamic(exported):
    paths, runner = exported
    ids = {g: onnx.load(p).graph.input[0] for g, p in (("prefill", paths.prefill), ("decode", paths.decode))}
    dims = {g: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for g, i in ids.items()}
    assert dims["prefill"] == ["batch", "seq"] and dims["decode"] == ["batch", 1]
    latent = [n for n in runner.cache_names if n.endswith("latent_kv")]
    assert latent and all(runner.declared[n][0][:2] == ["batch", "past"] for n in latent)


@pytest.mark.parametrize("batch,length", [(1, 1), (2, 7), (3, 70), (1, 130)])
def test_prefill_and_16_decode_steps_match_pytorch(exported, model, batch, length):
    _, runner = exported
    errors = compare(model, runner, batch, length, decode_steps=16, seed=batch * 1000 + length)
    assert errors["prefill"] <= TOL and errors["decode"] <= TOL, errors


def test_prefill_continues_from_a_cache(exported, model):
    """Prefill in two pieces (second piece with the first's cache) equals PyTorch doing the same."""
    _, runner = exported
    ids = torch.randint(0, model.config.vocab_size, (2, 50))
    with torch.no_grad():
        _, cache = model.forward_cached(ids[:, :20], None)
        logits, cache = model.forward_cached(ids[:, 20:], cache)
    _, ort_cache = runner.prefill(ids[:, :20].numpy())
    ort_logits, ort_cache = runner.prefill(ids[:, 20:].numpy(), ort_cache)
    assert max_rel_err(ort_logits, logits.numpy()) <= TOL
    for a, b in zip(ort_cache, cache.flatten()):
        assert max_rel_err(a, b.numpy()) <= TOL


def test_generate_matches_pytorch_greedy(exported, model):
    _, runner = exported
    prompt = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=8)
    np.testing.assert_array_equal(runner.generate(prompt.numpy(), 8), want.numpy())


# ------------------------------------------------------------------------------------- runner checks

@pytest.fixture(scope="module")
def runner(exported):
    return exported[1]


def _cache(runner, batch=2, past=3):
    return [np.zeros([batch if d == "batch" else past if d == "past" else d for d in runner.declared[n][0]],
                     np.float32) for n in runner.cache_names]


def test_runner_names_the_wrong_input(runner):
    ids = np.zeros((2, 4), np.int64)
    with pytest.raises(ValueError, match=r"input_ids must have shape \[batch, seq\]"):
        runner.prefill(np.zeros(4, np.int64))
    with pytest.raises(TypeError, match="input_ids"):
        runner.prefill(ids.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        runner.prefill(ids + 1000)
    with pytest.raises(ValueError, match=r"decode step must have shape \[batch, 1\]"):
        runner.decode(ids, _cache(runner))
    cache = _cache(runner)
    name = runner.cache_names[1]
    cache[1] = cache[1][..., :-1]                         # recurrent state with V - 1 columns
    with pytest.raises(ValueError, match=f"{name} must have shape"):
        runner.prefill(ids, cache)
    cache = _cache(runner)
    cache[0] = cache[0][:1]                               # batch 1 where input_ids has batch 2
    with pytest.raises(ValueError, match=f"{runner.cache_names[0]} axis 0 \\(batch\\)"):
        runner.prefill(ids, cache)
    cache = _cache(runner)
    cache[2] = cache[2][None]                             # rank 4 instead of 3
    with pytest.raises(ValueError, match=f"{runner.cache_names[2]} must have rank 3"):
        runner.prefill(ids, cache)
    with pytest.raises(ValueError, match="cache must hold"):
        runner.prefill(ids, _cache(runner)[:-1])
    cache = _cache(runner)
    cache[1] = cache[1].astype(np.float64)
    with pytest.raises(TypeError, match=f"{runner.cache_names[1]} must have dtype float32"):
        runner.prefill(ids, cache)
    with pytest.raises(ValueError, match="decode needs the cache"):
        runner.decode(ids[:, :1], None)


def test_runner_empty_cache_matches_model_empty_cache(runner, model):
    ours = runner.empty_cache(3)
    theirs = HybridCache.empty(model.config, 3).flatten()
    assert [a.shape for a in ours] == [tuple(t.shape) for t in theirs]


def test_float64_model_is_refused(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="float64"):
        export_hybrid(HybridModel(HybridConfig.tiny()).double(), str(tmp_path))


def test_runner_reports_missing_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="prefill.onnx"):
        OnnxHybridRunner(str(tmp_path))


# ------------------------------------------------------------------------------------------ CLI, demo

def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_demo_step_exports_and_runs(tmp_path, capsys):
    from kda_compile.export.demo_step import run_demo
    result = run_demo(str(tmp_path), length=40, decode_steps=4)
    assert result["ok"] and result["prefill_err"] <= TOL and result["decode_err"] <= TOL
    assert result["kda_nodes"] == HybridConfig.tiny().layer_types.count(KDA)
    assert os.path.exists(result["prefill"]) and os.path.exists(result["decode"])
    assert "onnxruntime vs PyTorch" in capsys.readouterr().out


# -------------------------------------------------------------------------------- default body, Kimi MoE

@pytest.mark.parametrize("version,body", [("1.30.0", "loop"), ("1.31.2", "loop"), ("1.32.0", "linear_attention"),
                                          ("2.0.1", "linear_attention")])
def test_default_body_follows_the_onnxruntime_version(monkeypatch, version, body):
    import onnxruntime

    from kda_compile.export import default_body
    monkeypatch.setattr(onnxruntime, "__version__", version)
    assert default_body() == body


@pytest.mark.parametrize("moe_impl", ["dense", "gather"])
def test_kimi_checkpoint_with_moe_exports_and_matches_pytorch(tmp_path, moe_impl):
    """A loaded Kimi Linear checkpoint (MoE with a score-correction bias, MLA with the shared key part) exports
    with the default body; onnxruntime matches PyTorch for prefill and 16 decode steps."""
    from kda_compile.export import default_body
    from kda_compile.moe import MoE
    torch.manual_seed(0)
    source = HybridModel(HybridConfig.tiny_kimi())
    with torch.no_grad():
        for block in source.blocks:
            if isinstance(block.mlp, MoE):
                block.mlp.e_score_correction_bias.normal_(0, 0.05)
    source.save_pretrained(str(tmp_path / "ckpt"))
    kimi = HybridModel.from_pretrained(str(tmp_path / "ckpt"))
    paths = export_hybrid(kimi, str(tmp_path / "onnx"), moe_impl=moe_impl)
    assert paths.body == default_body()
    ops = {n.op_type for n in onnx.load(paths.decode).graph.node}
    assert {"TopK", "Sigmoid"} <= ops and ("Gather" in ops if moe_impl == "gather" else True)
    assert all(m.impl == "auto" for m in kimi.modules() if isinstance(m, MoE))   # restored after export
    errors = compare(kimi, OnnxHybridRunner(str(tmp_path / "onnx")), batch=2, length=40, decode_steps=16)
    assert max(errors.values()) <= TOL, errors


def test_unknown_moe_impl_and_body_are_refused(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="moe_impl"):
        export_hybrid(HybridModel(HybridConfig.tiny_kimi()), str(tmp_path), moe_impl="loop")
    with pytest.raises(ValueError, match="body"):
        export_hybrid(HybridModel(HybridConfig.tiny()), str(tmp_path), body="scan")
