"""The fused organisation of the Triton forward (kernels_triton/chunk_fused.py, config ``organisation="fused"``).

On the CPU under Triton's interpreter at tiny sizes: the relative error against the float64 token recurrence
(the tolerances of test_chunk.py), causality bit for bit, batch invariance bit for bit, the fallback to the staged
organisation where the fused one does not apply, and the config knob's checks and classification.
"""
from __future__ import annotations

import pytest
import torch

from kernel_cases import GPU, backends, case_inputs, device, finite_err, flags, recurrence64
from test_chunk import _redraw_after, _tol, non_finite_gate_case

FUSED = {"organisation": "fused"}

CASES = {
    "ragged_gva_fp32": (dict(dtype="float32", B=2, T=70, H=1, HV=2, K=32, V=32), {}),
    # an empty sequence, a 1-token one, one of exactly one chunk, a ragged one of three chunks
    "varlen_empty_one_fp32": (dict(dtype="float32", cu=[0, 0, 1, 65, 65, 150], H=1, HV=2, K=16, V=16), {}),
    "varlen_prologue_bf16": (dict(dtype="bfloat16", cu=[0, 5, 50, 50, 99, 100], H=1, HV=2, K=32, V=32, gate="raw",
                                  l2norm=True, beta_logits=True), {}),
    "c32_safe_vfirst_fp32": (dict(dtype="float32", B=2, T=45, H=1, HV=2, K=32, V=16, C=32, gate="raw",
                                  lower_bound=-5.0, state_v_first=True, l2norm=True), {}),
    "c32_safe_vfirst_fp16": (dict(dtype="float16", B=1, T=45, H=2, HV=2, K=32, V=32, C=32, gate="raw",
                                  lower_bound=-5.0, state_v_first=True, l2norm=True), {}),
    "gate_noA_negeig_fp32": (dict(dtype="float32", B=1, T=40, H=1, HV=1, K=32, V=32, gate="raw", lower_bound=-3.0,
                                  drop_A_log=True, beta_logits=True, neg_eig=True), {}),
    "gate_no_bound_bf16": (dict(dtype="bfloat16", B=1, T=90, H=1, HV=2, K=16, V=32, gate="raw", l2norm=True), {}),
    # strong decay and masked gates: large factors, and the diagonal tiles taken element-wise
    "strong_gate_fp32": (dict(dtype="float32", cu=[0, 20, 83], H=1, HV=2, K=32, V=32, gscale=30.0, tol=1e-4), {}),
    "masked_gate_l2_fp32": (dict(dtype="float32", B=1, T=70, H=1, HV=2, K=32, V=32, masked=True, l2norm=True,
                                 tol=3e-4), {}),
    "neg_inf_gate_fp32": (dict(dtype="float32", B=2, T=70, H=1, HV=1, K=32, V=16, neg_inf=True, tol=3e-4), {}),
    "no_h0_fp32": (dict(dtype="float32", B=1, T=130, H=1, HV=2, K=16, V=16, h0=False), {}),
    # the inverse's diagonal blocks by forward substitution, and by products; a narrower V block (two programs)
    "subst_bv16_fp32": (dict(dtype="float32", B=1, T=100, H=1, HV=2, K=32, V=32),
                        {"solve_diag": "subst", "fused_BV": 16}),
    # more channels than one K slice (kernels_triton.chunk_fused.K_SLICE): the products summed over slices, the
    # last one partly masked; and the element-wise diagonal tiles over slices
    "k_slices_k80_l2_fp32": (dict(dtype="float32", B=1, T=100, H=1, HV=2, K=80, V=32, gate="raw", lower_bound=-5.0,
                                  l2norm=True), {}),
    "k_slices_masked_k64_fp32": (dict(dtype="float32", B=1, T=70, H=1, HV=1, K=64, V=16, masked=True, l2norm=True,
                                      tol=3e-4), {}),
    "diag_products_c32_fp32": (dict(dtype="float32", B=2, T=45, H=1, HV=1, K=16, V=16, C=32),
                               {"solve_diag": "ieee", "precision": "ieee"}),
}


def fused_forward(low, case, config=None, return_states=False):
    """The Triton forward called directly with the fused organisation (the public API takes no kernel config)."""
    from kda_compile.api import _options
    from kda_compile.kernels_triton.chunk_fwd import chunk_kda_fwd
    kw = flags(case)
    opts = _options(low["q"], None, kw["use_qk_l2norm_in_kernel"], kw["use_gate_in_kernel"],
                    kw["use_beta_sigmoid_in_kernel"], kw["allow_neg_eigval"], kw.get("lower_bound"),
                    case.get("C", 64), kw["state_v_first"])
    return chunk_kda_fwd(low["q"], low["k"], low["v"], low["g"], low["beta"], low.get("initial_state"),
                         low.get("cu_seqlens"), low.get("A_log"), low.get("dt_bias"), opts, True,
                         {**FUSED, **(config or {})}, return_states=return_states)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", backends("triton"))
def test_fused_matches_float64_recurrence(backend, name):
    case, config = CASES[name]
    low, ref = case_inputs(case, device())
    o, s = fused_forward(low, case, config)
    ro, rs = recurrence64(ref, case)
    tol = _tol(case, "triton", GPU)
    assert o.shape == low["v"].shape and o.dtype == low["v"].dtype and s.dtype == torch.float32
    e_o, e_s = finite_err(o, ro), finite_err(s, rs)
    assert e_o <= tol and e_s <= tol, f"fused {name}: rel err o={e_o:.3g} state={e_s:.3g} > {tol:g}"


def test_fused_kernel_runs_instead_of_the_staged_one(monkeypatch):
    """The knob really selects the fused kernel (a broken staged path cannot make the tests above pass)."""
    pytest.importorskip("triton")
    from kda_compile.kernels_triton import chunk_fwd

    def staged_must_not_run(*args, **kwargs):
        raise AssertionError("the staged intra stage ran with organisation='fused'")

    monkeypatch.setattr(chunk_fwd, "run_intra", staged_must_not_run)
    case = dict(dtype="float32", B=1, T=20, H=1, HV=1, K=16, V=16)
    low, ref = case_inputs(case, device())
    o, s = fused_forward(low, case)
    ro, rs = recurrence64(ref, case)
    assert finite_err(o, ro) <= 2e-5 and finite_err(s, rs) <= 2e-5


# ---------------------------------------------------------------------------------------------- causality

CAUSAL = {
    "log": dict(dtype="float32", B=1, T=150, H=1, HV=2, K=32, V=32, cut=70),
    "safe_l2": dict(dtype="float32", B=1, T=150, H=1, HV=1, K=32, V=32, cut=70, gate="raw", lower_bound=-5.0,
                    l2norm=True),
    "strong_c32": dict(dtype="float32", B=1, T=150, H=1, HV=1, K=16, V=16, C=32, cut=75, gscale=30.0),
}


@pytest.mark.parametrize("name", list(CAUSAL))
@pytest.mark.parametrize("backend", backends("triton"))
def test_fused_later_tokens_never_move_earlier_outputs(backend, name):
    """Bit for bit, in float32 so that no output rounding hides a leak."""
    case = CAUSAL[name]
    low, _ = case_inputs(case, device())
    cut = case["cut"]
    before = fused_forward(low, case)[0][:, :cut]
    after = fused_forward(_redraw_after(low, case), case)[0][:, :cut]
    assert torch.equal(before, after), f"earlier outputs moved by {(before - after).abs().max().item():.3g}"


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("backend", backends("triton"))
def test_fused_non_finite_gate_never_moves_earlier_outputs(backend, bad):
    case, low, broken, t = non_finite_gate_case(bad)
    good = fused_forward(low, case)[0][:, :t]
    got = fused_forward(broken, case)[0][:, :t]
    assert torch.equal(good, got), f"outputs before t moved ({bad} gate): {(good - got).abs().max().item():.3g}"


# ---------------------------------------------------------------------------------------- batch invariance

@pytest.mark.parametrize("backend", backends("triton"))
def test_fused_is_batch_invariant(backend):
    """A sequence gives the same bits alone, in a batch and in a varlen pack."""
    case = dict(dtype="float32", B=3, T=100, H=1, HV=2, K=32, V=32, gate="raw", l2norm=True)
    low, _ = case_inputs(case, device())
    o_batch, s_batch = fused_forward(low, case)
    alone = {n: (x[1:2] if n in ("q", "k", "v", "g", "beta", "initial_state") else x) for n, x in low.items()}
    o_alone, s_alone = fused_forward(alone, case)
    T = case["T"]
    pack = {n: torch.cat([x[0, :7], x[1], x[2, :70]])[None] for n, x in low.items()
            if n in ("q", "k", "v", "g", "beta")}
    pack.update(A_log=low["A_log"], dt_bias=low["dt_bias"], initial_state=low["initial_state"],
                cu_seqlens=torch.tensor([0, 7, 7 + T, 77 + T], device=low["q"].device))
    o_pack, s_pack = fused_forward(pack, case)
    assert torch.equal(o_alone[0], o_batch[1]) and torch.equal(s_alone[0], s_batch[1])
    assert torch.equal(o_alone[0], o_pack[0, 7:7 + T]) and torch.equal(s_alone[0], s_pack[1])


# ------------------------------------------------------------------------------------------- fallbacks

@pytest.mark.parametrize("backend", backends("triton"))
def test_intermediate_states_fall_back_to_the_staged_organisation(backend):
    """``return_states`` is not covered by the fused kernel: the staged one runs and gives the same result."""
    from kda_compile.kernels_triton.chunk_fused import fused_reason
    assert fused_reason(True) and fused_reason(False) is None
    case = dict(dtype="float32", B=1, T=70, H=1, HV=1, K=16, V=16)
    low, _ = case_inputs(case, device())
    o, s, h = fused_forward(low, case, return_states=True)
    o_staged, s_staged, h_staged = fused_forward(low, case, {"organisation": "staged"}, return_states=True)
    assert torch.equal(o, o_staged) and torch.equal(s, s_staged) and torch.equal(h, h_staged)


@pytest.mark.parametrize("backend", backends("triton"))
def test_fused_state_pool(backend):
    """The state-pool path (gather, forward, scatter) with the fused organisation: a padding slot is skipped."""
    from kda_compile.api import _options
    from kda_compile.kernels_triton.chunk_fwd import chunk_kda_fwd_pooled
    case = dict(dtype="float32", cu=[0, 30, 31, 90], H=1, HV=2, K=16, V=16)
    low, ref = case_inputs(case, device())
    opts = _options(low["q"], None, False, False, False, False, None, 64, False)
    pool = torch.randn(5, 2, 16, 16, device=low["q"].device)
    slots = torch.tensor([3, -1, 0], device=pool.device)
    args = (low["q"], low["k"], low["v"], low["g"], low["beta"])
    o, s = chunk_kda_fwd_pooled(*args, pool.clone(), slots, low["cu_seqlens"], None, None, opts, False, FUSED)
    o_st, s_st = chunk_kda_fwd_pooled(*args, pool.clone(), slots, low["cu_seqlens"], None, None, opts, False, {})
    assert finite_err(o, o_st.double()) <= 2e-5 and finite_err(s, s_st.double()) <= 2e-5
    assert torch.count_nonzero(o[0, 30]) == 0 and torch.count_nonzero(s[1]) == 0


# ---------------------------------------------------------------------------------------------- config

def test_organisation_knob_is_checked_classified_and_searched():
    pytest.importorskip("triton")
    from kda_compile import buckets
    from kda_compile.kernels_triton.chunk_fwd import get_configs
    from kda_compile.kernels_triton.config import chunk_config
    assert chunk_config({}).organisation == "staged"
    with pytest.raises(ValueError, match="organisation"):
        chunk_config({"organisation": "merged"})
    with pytest.raises(ValueError, match="fused_BV"):
        chunk_config({"fused_BV": 48})
    assert buckets.is_bit_changing("triton", "organisation")
    assert not buckets.is_bit_changing("triton", "fused_BV") and not buckets.is_bit_changing("triton", "fused_warps")
    space = get_configs()
    assert space[0] == {} and space[-1] == FUSED and len(space) == len({str(c) for c in space})
