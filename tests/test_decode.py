"""fused_recurrent_kda, the decode path, on every backend against the float64 token recurrence: few tokens per
sequence, every prologue flag, a state pool (``ssm_state_indices``), speculative decoding (2-D indices with
``num_accepted_tokens``) and the in-place state update.  CPU: Triton's interpreter and TileLang's C target at
small sizes; ``gpu`` cases at serving shapes.
"""
from __future__ import annotations

import pytest
import torch

from kda_compile import fused_recurrent_kda
from kernel_cases import GPU, backends, case_inputs, device, finite_err, flags

TOL = {"float32": 2e-5, "float16": 1e-2, "bfloat16": 2e-2}

CASES = {
    "prologue_gva_bf16": dict(dtype="bfloat16", B=4, T=1, H=2, HV=4, K=64, V=64, gate="raw", l2norm=True,
                              beta_logits=True),
    "varlen_vfirst_safe_fp32": dict(dtype="float32", cu=[0, 3, 3, 9], H=1, HV=1, K=32, V=32, state_v_first=True,
                                    gate="raw", lower_bound=-5.0, beta_logits=True, neg_eig=True),
    "k128_three_tokens_fp16": dict(dtype="float16", B=2, T=3, H=1, HV=1, K=128, V=128, l2norm=True),
    "no_state_fp32": dict(dtype="float32", B=3, T=2, H=1, HV=2, K=32, V=32, h0=False),
}


def _reference(ref, case, **kw):
    return fused_recurrent_kda(**ref, **flags(case), backend="reference", **kw)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", backends())
def test_decode_matches_float64_recurrence(backend, name):
    case = CASES[name]
    low, ref = case_inputs(case, device())
    o, s = fused_recurrent_kda(**low, **flags(case), output_final_state=True, backend=backend)
    ro, rs = _reference(ref, case, output_final_state=True)
    tol = max(TOL[case["dtype"]], 3e-3 if GPU and case["dtype"] == "float32" else 0.0)
    e_o, e_s = finite_err(o, ro), finite_err(s, rs)
    assert e_o <= tol and e_s <= tol, f"{backend} {name}: rel err o={e_o:.3g} state={e_s:.3g} > {tol:g}"


def _pool_case(low, ref, speculative: bool, seed: int = 1):
    """A pool of 3N + 2 states; sequence n reads slot idx[n] (or idx[n, num_accepted_tokens[n] - 1])."""
    N = low["initial_state"].shape[0]
    P = 3 * N + 2
    gen = torch.Generator().manual_seed(seed)
    pool64 = torch.randn(P, *low["initial_state"].shape[1:], generator=gen, dtype=torch.float64) * 0.5
    extra = {}
    if speculative:
        S = 3
        idx = torch.randperm(P, generator=gen)[:N * S].view(N, S)
        cu = low.get("cu_seqlens")
        tokens = (cu[1:] - cu[:-1]).cpu() if cu is not None else torch.full((N,), low["q"].shape[1])
        # at most the tokens given to the sequence (more is refused as bad input)
        extra["num_accepted_tokens"] = torch.minimum(torch.randint(1, S + 1, (N,), generator=gen), tokens)
    else:
        idx = torch.randperm(P, generator=gen)[:N]
    pool = pool64.float().to(low["q"].device)
    low = {**low, "initial_state": pool, "ssm_state_indices": idx.to(pool.device),
           **{n: x.to(pool.device) for n, x in extra.items()}}
    ref = {**ref, "initial_state": pool.double(), "ssm_state_indices": idx.to(pool.device),
           **{n: x.to(pool.device) for n, x in extra.items()}}
    return low, ref


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("backend", backends())
def test_state_pool(backend, inplace):
    """Continuous batching: each sequence reads (and, in place, writes back) its own slot of a larger pool."""
    case = dict(dtype="float32", B=3, T=2, H=1, HV=2, K=32, V=32)
    low, ref = _pool_case(*case_inputs(case, device()), speculative=False)
    with torch.no_grad():
        o, s = fused_recurrent_kda(**low, output_final_state=not inplace, inplace_final_state=inplace,
                                   backend=backend)
        ro, rs = _reference(ref, case, output_final_state=not inplace, inplace_final_state=inplace)
    tol = 3e-3 if GPU else 2e-5
    assert finite_err(o, ro) <= tol and finite_err(low["initial_state"], ref["initial_state"]) <= tol
    if not inplace:
        assert finite_err(s, rs) <= tol


@pytest.mark.parametrize("backend", backends("reference", "triton"))
def test_speculative_decoding_in_place(backend):
    """2-D indices: the initial state from column num_accepted_tokens - 1, the state after token t to idx[n, t]."""
    case = dict(dtype="float32", cu=[0, 3, 5, 6], H=1, HV=2, K=16, V=16)
    low, ref = _pool_case(*case_inputs(case, device()), speculative=True)
    with torch.no_grad():
        o, _ = fused_recurrent_kda(**low, inplace_final_state=True, backend=backend)
        ro, _ = _reference(ref, case, inplace_final_state=True)
    tol = 3e-3 if GPU else 2e-5
    assert finite_err(o, ro) <= tol and finite_err(low["initial_state"], ref["initial_state"]) <= tol


@pytest.mark.parametrize("backend", backends("tilelang"))
def test_tilelang_refuses_speculative_decoding_by_name(backend):
    """Named explicitly, a backend that cannot run the call says why; by default the dispatch falls back."""
    from kda_compile import explain
    case = dict(dtype="float32", cu=[0, 3, 5, 6], H=1, HV=2, K=32, V=32)
    low, _ = _pool_case(*case_inputs(case, device()), speculative=True)
    with torch.no_grad(), pytest.raises(ValueError, match="speculative"):
        fused_recurrent_kda(**low, inplace_final_state=True, backend=backend)
    assert explain(**low, op="recurrent", inplace_final_state=True).backend.name != "tilelang"


@pytest.mark.parametrize("layout", [{"layout": "column", "decode_BV": 32, "decode_threads": 32},
                                    {"layout": "tile", "decode_BV": 16, "decode_threads": 64}])
@pytest.mark.parametrize("backend", backends("tilelang"))
def test_tilelang_decode_layouts(backend, layout):
    """Both TileLang decode layouts (a thread per state column; a reduction over a tile), varlen with an empty
    sequence, the safe gate, beta logits and the state stored [N, HV, V, K]."""
    from kda_compile.api import _options
    from kda_compile.kernels_tl.fused_recurrent import fused_recurrent_kda_fwd
    case = CASES["varlen_vfirst_safe_fp32"]
    low, ref = case_inputs(case, device())
    kw = flags(case)
    opts = _options(low["q"], None, False, True, True, True, -5.0, 64, True)
    o, s = fused_recurrent_kda_fwd(low["q"], low["k"], low["v"], low["g"], low["beta"], low["initial_state"],
                                   low["cu_seqlens"], low["A_log"], low["dt_bias"], opts, output_final_state=True,
                                   config=layout)
    ro, rs = _reference(ref, case, output_final_state=True)
    assert kw["state_v_first"]
    assert finite_err(o, ro) <= 2e-5 and finite_err(s, rs) <= 2e-5


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("backend", backends("triton", "tilelang"))
def test_gpu_serving_shapes(backend, B):
    case = dict(dtype="bfloat16", B=B, T=1, H=32, HV=32, K=128, V=128, l2norm=True)
    low, ref = case_inputs(case, "cuda")
    o, s = fused_recurrent_kda(**low, **flags(case), output_final_state=True, backend=backend)
    ro, rs = _reference(ref, case, output_final_state=True)
    assert finite_err(o, ro) <= 5e-3 and finite_err(s, rs) <= 5e-3
