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


@pytest.mark.parametrize("backend", backends())
def test_speculative_decoding_in_place(backend):
    """2-D indices: the initial state from column num_accepted_tokens - 1, the state after token t to idx[n, t]."""
    case = dict(dtype="float32", cu=[0, 3, 5, 6], H=1, HV=2, K=32, V=32)
    low, ref = _pool_case(*case_inputs(case, device()), speculative=True)
    with torch.no_grad():
        o, _ = fused_recurrent_kda(**low, inplace_final_state=True, backend=backend)
        ro, _ = _reference(ref, case, inplace_final_state=True)
    tol = 3e-3 if GPU else 2e-5
    assert finite_err(o, ro) <= tol and finite_err(low["initial_state"], ref["initial_state"]) <= tol


LAYOUTS = [{"layout": "column", "decode_BV": 32, "decode_threads": 32},
           {"layout": "tile", "decode_BV": 16, "decode_threads": 64}]


def _tilelang_decode(low, case, config, **serving):
    """The TileLang decode kernel called directly with a kernel ``config`` (the public call picks its own)."""
    from kda_compile.api import _options
    from kda_compile.kernels_tl.fused_recurrent import fused_recurrent_kda_fwd
    kw = flags(case)
    opts = _options(low["q"], None, kw["use_qk_l2norm_in_kernel"], kw["use_gate_in_kernel"],
                    kw["use_beta_sigmoid_in_kernel"], kw["allow_neg_eigval"], kw.get("lower_bound"), 64,
                    kw["state_v_first"])
    return fused_recurrent_kda_fwd(low["q"], low["k"], low["v"], low["g"], low["beta"], low["initial_state"],
                                   low.get("cu_seqlens"), low.get("A_log"), low.get("dt_bias"), opts,
                                   config=config, **serving)


@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "final_state"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[c["layout"] for c in LAYOUTS])
@pytest.mark.parametrize("backend", backends("tilelang"))
def test_tilelang_speculative_decoding_layouts(backend, layout, in_place):
    """Both TileLang decode layouts on speculative decoding: varlen with several tokens per sequence, grouped value
    heads, the state stored [N, HV, V, K], a padding row (negative initial slot: zero output and final state, no
    pool access) and a padding column (not written).  In place: the state after token t goes to idx[n, t];
    otherwise the initial column is 0 (no num_accepted_tokens) and the final states are returned."""
    case = dict(dtype="float32", cu=[0, 3, 5, 7, 9], H=1, HV=2, K=32, V=32, state_v_first=True, gate="raw",
                l2norm=True, beta_logits=True)
    low, ref = case_inputs(case, device())
    gen = torch.Generator().manual_seed(2)
    pool = (torch.randn(14, *low["initial_state"].shape[1:], generator=gen) * 0.5).to(low["q"].device)
    idx = torch.tensor([[0, 1, 2], [-1, -1, -1], [6, -1, 7], [9, 3, 12]], device=pool.device)
    serving = dict(ssm_state_indices=idx)
    if in_place:
        serving["num_accepted_tokens"] = torch.tensor([2, 1, 1, 2], device=pool.device)
    low = {**low, "initial_state": pool.clone()}
    ref = {**ref, "initial_state": pool.double()}
    with torch.no_grad():
        o, s = _tilelang_decode(low, case, layout, output_final_state=not in_place, inplace_final_state=in_place,
                                **serving)
        ro, rs = _reference(ref, case, output_final_state=not in_place, inplace_final_state=in_place, **serving)
    assert torch.equal(o[:, 3:5], torch.zeros_like(o[:, 3:5]))       # the padding row outputs zeros
    written = [0, 1, 2, 6, 9, 3] if in_place else []   # row 2's second token has slot -1
    untouched = [slot for slot in range(pool.shape[0]) if slot not in written]
    assert torch.equal(low["initial_state"][untouched], pool[untouched])
    e_o, e_pool = finite_err(o, ro), finite_err(low["initial_state"], ref["initial_state"])
    e_s = 0.0 if in_place else finite_err(s, rs)
    assert e_o <= 2e-5 and e_pool <= 2e-5 and e_s <= 2e-5, f"rel err o={e_o:.3g} pool={e_pool:.3g} state={e_s:.3g}"
    if not in_place:
        assert torch.equal(s[1], torch.zeros_like(s[1]))              # and a zero final state


@pytest.mark.parametrize("layout", LAYOUTS, ids=[c["layout"] for c in LAYOUTS])
@pytest.mark.parametrize("backend", backends("tilelang"))
def test_tilelang_decode_layouts(backend, layout):
    """Both TileLang decode layouts (a thread per state column; a reduction over a tile), varlen with an empty
    sequence, the safe gate, beta logits and the state stored [N, HV, V, K]."""
    case = CASES["varlen_vfirst_safe_fp32"]
    low, ref = case_inputs(case, device())
    o, s = _tilelang_decode(low, case, layout, output_final_state=True)
    ro, rs = _reference(ref, case, output_final_state=True)
    assert flags(case)["state_v_first"]
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
