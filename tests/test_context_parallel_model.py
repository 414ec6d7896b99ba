"""The hybrid KDA/MLA model under context parallelism (``model(ids_local, cp_context=ctx)``): 2 and 4 gloo
processes on 127.0.0.1 against the single-process model, for the logits (reassembled from every rank) and
the gradient of every parameter (summed over the ranks); float32 to 1e-5 relative, float64 to 1e-10.  The
logits also without autograd.  Layouts: contiguous parts, the load-balanced head + tail parts, arbitrary
pieces shorter than the convolution's halo, varlen packs.  The cases are in tests/cp_model_cases.py."""
from __future__ import annotations

import pytest
import torch

import cp_model_cases
import cp_spawn
from kda_compile.context_parallel import build_cp_context
from kda_compile.model import HybridConfig, HybridModel

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

KIMI = dict(config="tiny_kimi")     # KDA, KDA, MLA (with the shared key part), KDA; MoE
TINY = dict(config="tiny")          # KDA, KDA, KDA, MLA; SwiGLU
CASES = {
    2: [
        dict(name="one sequence, contiguous, fp32", offsets=[0, 100], dtype=torch.float32, **KIMI),
        dict(name="one sequence, head+tail, fp32", offsets=[0, 101], dtype=torch.float32, layout="head_tail",
             **KIMI),
        dict(name="varlen pack, head+tail, fp32", offsets=[0, 37, 38, 90], dtype=torch.float32,
             layout="head_tail", **TINY),
    ],
    4: [
        dict(name="one sequence, contiguous, fp32", offsets=[0, 130], dtype=torch.float32, **KIMI),
        dict(name="one sequence, head+tail, fp32", offsets=[0, 131], dtype=torch.float32, layout="head_tail",
             **KIMI),
        dict(name="varlen, any pieces, short pieces, fp64", offsets=[0, 2, 50, 81], dtype=torch.float64,
             pieces=[[(0, 1), (60, 81)], [(1, 3)], [(3, 4), (50, 60)], [(4, 50)]], **KIMI),
    ],
}


def _worst_gradient(errors: dict) -> tuple:
    return max((e, metric) for metric, e in errors.items() if metric.startswith("grad"))


@pytest.mark.parametrize("world", [2, 4])
def test_model_context_parallel_matches_single_process(world):
    collected = cp_spawn.run_group(world, CASES[world], cp_model_cases.run_model_case)
    rows, bad = [], []
    for case in CASES[world]:
        tol = TOL[case["dtype"]]
        for rank in range(world):   # every rank checks the reassembled logits and the summed gradients
            errors = collected[rank][case["name"]]
            bad += [f"W={world} {case['name']} rank {rank}: {metric} {e:.2e}"
                    for metric, e in errors.items() if not e <= tol]
        worst = max(_worst_gradient(collected[rank][case["name"]]) for rank in range(world))
        logits = max(e for rank in range(world) for metric, e in collected[rank][case["name"]].items()
                     if metric.startswith("logits"))
        rows.append(f"W={world} {case['name']:40s} logits {logits:.2e}  worst gradient {worst[0]:.2e} ({worst[1]})")
    print("\nrelative errors against the single process (largest over the ranks)\n" + "\n".join(rows))
    assert not bad, "above tolerance:\n" + "\n".join(bad)


# --------------------------------------------------------------------- argument checks, without processes

def test_cp_forward_rejects_cache_and_bad_shapes():
    model = HybridModel(HybridConfig.tiny())
    ctx = build_cp_context(total_tokens=10, rank=0, world_size=2)
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="use_cache"):
        model(ids, use_cache=True, cp_context=ctx)
    with pytest.raises(ValueError, match="cache"):
        model.forward(ids, cache=model.forward_cached(ids)[1], cp_context=ctx)
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        model(torch.zeros(1, 4, dtype=torch.long), cp_context=ctx)
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        model(torch.zeros(2, 5, dtype=torch.long), cp_context=ctx)
    with pytest.raises(TypeError, match="KDAContext"):
        model(ids, cp_context=object())
    wrong_conv = build_cp_context(total_tokens=10, rank=0, world_size=2, conv1d_kernel_size=3)
    with pytest.raises(ValueError, match="conv_size"):
        model(ids, cp_context=wrong_conv)
    kda, mla = model.blocks[0].mixer, model.blocks[3].mixer
    x = torch.zeros(1, 5, model.config.hidden_size)
    with pytest.raises(ValueError, match="recurrent_state"):
        kda(x, recurrent_state=torch.zeros(1, kda.HV, kda.K, kda.V), cp_context=ctx)
    with pytest.raises(ValueError, match="latent_prefix"):
        mla(x, latent_prefix=torch.zeros(1, 2, model.config.mla_cache_dim), cp_context=ctx)
