"""The public API (chunk_kda, fused_recurrent_kda, explain) against the float64 recurrence."""
import pytest
import torch

import kda_compile
from kda_compile import chunk_kda, dispatch, explain, fused_recurrent_kda
from kda_compile.reference import KDAOptions, kda_reference

from kda_inputs import make_inputs, rel_err

TENSORS = ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "A_log", "dt_bias")


def recurrence(args, **opts):
    """The definition, in float64, for any args dict (dtype of the args is upcast)."""
    t = {n: (args[n].double() if args.get(n) is not None and args[n].is_floating_point() else args.get(n))
         for n in TENSORS}
    options = KDAOptions(scale=args["q"].shape[-1] ** -0.5, **opts)
    return kda_reference(**t, opts=options, algorithm="recurrent")


def split(args):
    a = dict(args)
    return [a.pop(n) for n in ("q", "k", "v", "g", "beta")], a


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("fn", ["chunk", "recurrent"])
def test_public_api_matches_recurrence(dtype, tol, fn):
    args = make_inputs(B=2, T=45, H=2, HV=4, K=16, V=16, dtype=dtype, gate="raw", beta_logits=True)
    flags = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)
    (q, k, v, g, beta), rest = split(args)
    f = chunk_kda if fn == "chunk" else fused_recurrent_kda
    o, s = f(q, k, v, g, beta, output_final_state=True, **flags, **rest)
    ref_o, ref_s = recurrence(args, **flags)
    assert o.dtype == dtype and o.shape == v.shape
    assert s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(o, ref_o) < tol and rel_err(s, ref_s) < tol


def test_final_state_only_when_asked():
    (q, k, v, g, beta), rest = split(make_inputs(dtype=torch.float32))
    assert chunk_kda(q, k, v, g, beta, **rest)[1] is None
    assert fused_recurrent_kda(q, k, v, g, beta, **rest)[1] is None


def test_positional_order_is_fla_s():
    args = make_inputs(B=1, T=10, dtype=torch.float32)
    (q, k, v, g, beta), rest = split(args)
    h0 = rest["initial_state"]
    a = chunk_kda(q, k, v, g, beta, 0.3, h0, True)                       # scale, initial_state, output_final_state
    b = fused_recurrent_kda(q, k, v, g, beta, None, None, 0.3, h0, True)  # A_log, dt_bias, scale, state, final
    assert rel_err(a[0], b[0]) < 1e-5 and rel_err(a[1], b[1]) < 1e-5


def test_zero_length_passes_state_through():
    args = make_inputs(B=2, T=0, dtype=torch.float32)
    (q, k, v, g, beta), rest = split(args)
    for fn in (chunk_kda, fused_recurrent_kda):
        o, s = fn(q, k, v, g, beta, output_final_state=True, **rest)
        assert o.shape == v.shape and o.numel() == 0
        assert torch.equal(s, rest["initial_state"]) and s.data_ptr() != rest["initial_state"].data_ptr()


def test_non_contiguous_inputs():
    args = make_inputs(B=2, T=33, H=2, K=8, V=8)
    weird = {}
    for n, x in args.items():
        if n in ("q", "k", "v", "g"):  # [B, T, H, D] stored as [B, H, T, D]
            weird[n] = x.transpose(1, 2).contiguous().transpose(1, 2)
            assert not weird[n].is_contiguous()
        else:
            weird[n] = x
    (q, k, v, g, beta), rest = split(weird)
    o, s = chunk_kda(q, k, v, g, beta, output_final_state=True, **rest)
    ref_o, ref_s = recurrence(args)
    assert rel_err(o, ref_o) < 1e-10 and rel_err(s, ref_s) < 1e-10


def test_varlen_with_empty_and_single_token_sequences():
    args = make_inputs(H=2, K=8, V=8, cu_seqlens=[0, 0, 37, 37, 38], dtype=torch.float32)
    (q, k, v, g, beta), rest = split(args)
    o, s = chunk_kda(q, k, v, g, beta, output_final_state=True, **rest)
    ref_o, ref_s = recurrence(args)
    assert rel_err(o, ref_o) < 1e-5 and rel_err(s, ref_s) < 1e-5
    assert torch.equal(s[0], args["initial_state"][0])  # empty sequence: state passes through


def test_cu_seqlens_cpu_hint_gives_the_same_result():
    args = make_inputs(H=2, K=8, V=8, cu_seqlens=[0, 20, 50], dtype=torch.float32)
    (q, k, v, g, beta), rest = split(args)
    a = chunk_kda(q, k, v, g, beta, output_final_state=True, **rest)
    b = chunk_kda(q, k, v, g, beta, output_final_state=True, cu_seqlens_cpu=rest["cu_seqlens"].clone(), **rest)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("state_v_first", [False, True])
def test_return_intermediate_states(state_v_first):
    args = make_inputs(B=2, T=70, H=2, K=8, V=8, dtype=torch.float32, state_v_first=state_v_first)
    (q, k, v, g, beta), rest = split(args)
    with torch.inference_mode():
        o, s, h = chunk_kda(q, k, v, g, beta, output_final_state=True, return_intermediate_states=True,
                            state_v_first=state_v_first, **rest)
    assert h.shape == (2, 2, 2, 8, 8) and h.dtype == q.dtype
    assert torch.allclose(h[:, 0], rest["initial_state"])
    with pytest.raises(ValueError, match="inference only"):
        q.requires_grad_(True)
        chunk_kda(q, k, v, g, beta, return_intermediate_states=True, **rest)


def test_state_v_first_is_the_transposed_state():
    args = make_inputs(B=1, T=30, K=8, V=4, dtype=torch.float32)
    (q, k, v, g, beta), rest = split(args)
    o1, s1 = chunk_kda(q, k, v, g, beta, output_final_state=True, **rest)
    rest["initial_state"] = rest["initial_state"].transpose(-1, -2).contiguous()
    o2, s2 = chunk_kda(q, k, v, g, beta, output_final_state=True, state_v_first=True, **rest)
    assert s2.shape == (1, 2, 4, 8)
    assert rel_err(o2, o1) < 1e-6 and rel_err(s2.transpose(-1, -2), s1) < 1e-6


# ------------------------------------------------------------------------------------------------ serving

def decode_inputs(N=3, P=6):
    args = make_inputs(B=N, T=1, H=2, K=8, V=8, dtype=torch.float32, initial_state=False)
    pool = torch.randn(P, 2, 8, 8)
    return args, pool


def test_state_pool_inplace_update():
    args, pool = decode_inputs()
    idx = torch.tensor([4, 0, 2])
    (q, k, v, g, beta), _ = split(args)
    expected_o, expected_s = fused_recurrent_kda(q, k, v, g, beta, initial_state=pool[idx].clone(),
                                                 output_final_state=True)
    before = pool.clone()
    o, s = fused_recurrent_kda(q, k, v, g, beta, initial_state=pool, ssm_state_indices=idx,
                               inplace_final_state=True)
    assert s is None and rel_err(o, expected_o) < 1e-6
    assert rel_err(pool[idx], expected_s) < 1e-6
    untouched = torch.tensor([1, 3, 5])
    assert torch.equal(pool[untouched], before[untouched])


def test_state_pool_without_inplace_leaves_pool_alone():
    args, pool = decode_inputs()
    before = pool.clone()
    (q, k, v, g, beta), _ = split(args)
    o, s = fused_recurrent_kda(q, k, v, g, beta, initial_state=pool, output_final_state=True,
                               ssm_state_indices=torch.tensor([1, 1, 5]))
    assert torch.equal(pool, before) and s.shape == (3, 2, 8, 8)


def test_speculative_decoding_slots():
    """2-D indices: initial state from column num_accepted_tokens - 1, state after draft token t to column t."""
    N, S, P = 2, 3, 8
    args = make_inputs(B=1, H=2, K=8, V=8, dtype=torch.float32, cu_seqlens=[0, 3, 5], initial_state=False)
    pool = torch.randn(P, 2, 8, 8)
    idx = torch.tensor([[0, 1, 2], [3, 4, 5]])
    accepted = torch.tensor([2, 1])
    (q, k, v, g, beta), rest = split(args)
    # Expected: run each sequence token by token from its accepted slot.
    h0 = pool[torch.tensor([1, 3])].clone()
    expected_states = {}
    for n, (start, size) in enumerate([(0, 3), (3, 2)]):
        state = h0[n:n + 1]
        for t in range(size):
            sl = slice(start + t, start + t + 1)
            _, state = fused_recurrent_kda(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=state,
                                           output_final_state=True)
            expected_states[int(idx[n, t])] = state[0]
    fused_recurrent_kda(q, k, v, g, beta, initial_state=pool, cu_seqlens=rest["cu_seqlens"], ssm_state_indices=idx,
                        num_accepted_tokens=accepted, inplace_final_state=True)
    for slot, state in expected_states.items():
        assert rel_err(pool[slot], state) < 1e-5, f"slot {slot}"


def test_pool_is_inference_only():
    args, pool = decode_inputs()
    (q, k, v, g, beta), _ = split(args)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="inference only"):
        fused_recurrent_kda(q, k, v, g, beta, initial_state=pool, ssm_state_indices=torch.tensor([0, 1, 2]))


# ------------------------------------------------------------------------------------------- dispatch

def test_explain_names_the_backend_and_the_reasons():
    (q, k, v, g, beta), rest = split(make_inputs(dtype=torch.float32))
    choice = explain(q, k, v, g, beta, **rest)
    assert choice.backend.name == "reference"
    text = str(choice)
    assert "backend 'reference'" in text
    for name in ("tilelang", "triton"):
        if name not in kda_compile.backends():
            assert f"not {name}:" in text
    assert explain(q, k, v, g, beta, op="recurrent", backend="reference").reason == "forced by backend= argument"


def test_environment_variable_preference(monkeypatch):
    (q, k, v, g, beta), rest = split(make_inputs(dtype=torch.float32))
    monkeypatch.setenv("KDA_COMPILE_BACKEND", "reference")
    assert "KDA_COMPILE_BACKEND=reference" in explain(q, k, v, g, beta, **rest).reason
    monkeypatch.setenv("KDA_COMPILE_BACKEND", "nonexistent")
    choice = explain(q, k, v, g, beta, **rest)
    assert "named by KDA_COMPILE_BACKEND but not registered" in choice.rejected["nonexistent"]


def test_reference_backend_always_registered():
    assert "reference" in kda_compile.backends()
    assert kda_compile.backends()[-1] == "reference"


def _fake_chunk_backend(name, with_states, seen):
    """A backend preferred over every other that records which entry point ran."""
    from kda_compile.reference_backend import run_reference, run_reference_states

    def run(call, config):
        seen.append((name, "run"))
        return run_reference(call, config)

    def run_states(call, config):
        seen.append((name, "run_states"))
        return run_reference_states(call, config)

    return dispatch.Backend(name=name, supports=lambda call: None, run=run,
                            run_states=run_states if with_states else None)


@pytest.mark.parametrize("with_states", [True, False])
def test_intermediate_states_use_the_chosen_backend_when_it_can(monkeypatch, with_states):
    """return_intermediate_states goes through the dispatch: the chosen backend returns the chunk states
    when it can (the Triton backend does), else the next backend of the default order that can."""
    monkeypatch.delenv("KDA_COMPILE_BACKEND", raising=False)
    seen = []
    dispatch.register_backend(_fake_chunk_backend("fake_states", with_states, seen),
                              before=dispatch.backends()[0])
    try:
        args = make_inputs(B=1, T=40, H=1, K=8, V=8, dtype=torch.float32)
        (q, k, v, g, beta), rest = split(args)
        with torch.inference_mode():
            o, s, h = chunk_kda(q, k, v, g, beta, output_final_state=True, return_intermediate_states=True, **rest)
            ro, rs = chunk_kda(q, k, v, g, beta, output_final_state=True, backend="reference", **rest)
    finally:
        dispatch.unregister_backend("fake_states")
    assert seen == ([("fake_states", "run_states")] if with_states else [])
    assert torch.allclose(o, ro) and torch.allclose(s, rs) and h.shape == (1, 1, 1, 8, 8)


def test_intermediate_states_honour_a_forced_backend(monkeypatch):
    """backend= reaches the states op: the named backend runs it, even when another one is preferred, and a
    named backend that cannot return the states is an error (never a silent switch)."""
    from kda_compile.reference import kda_reference_chunk_states
    monkeypatch.delenv("KDA_COMPILE_BACKEND", raising=False)
    seen = []
    dispatch.register_backend(_fake_chunk_backend("fake_states", True, seen), before=dispatch.backends()[0])
    dispatch.register_backend(_fake_chunk_backend("fake_plain", False, seen), before=dispatch.backends()[0])
    try:
        args = make_inputs(B=2, T=70, H=2, K=8, V=8, dtype=torch.float32)
        (q, k, v, g, beta), rest = split(args)
        with torch.inference_mode():
            o, s, h = chunk_kda(q, k, v, g, beta, output_final_state=True, return_intermediate_states=True,
                                backend="reference", **rest)
            assert seen == []
            chunk_kda(q, k, v, g, beta, return_intermediate_states=True, backend="fake_states", **rest)
            assert seen == [("fake_states", "run_states")]
            with pytest.raises(ValueError, match="'fake_plain' cannot return the chunk states"):
                chunk_kda(q, k, v, g, beta, return_intermediate_states=True, backend="fake_plain", **rest)
    finally:
        dispatch.unregister_backend("fake_states")
        dispatch.unregister_backend("fake_plain")
    want = kda_reference_chunk_states(q, k, v, g, beta, rest["initial_state"],
                                      opts=KDAOptions(scale=8 ** -0.5))
    for got, ref in zip((o, s, h), want):
        assert torch.equal(got, ref)
