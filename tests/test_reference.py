"""The chunkwise reference equals the token recurrence in float64, and the properties users rely on hold."""
import pytest
import torch

from kda_compile.reference import KDAOptions, kda_reference, kda_reference_chunk_states

from kda_inputs import make_inputs, rel_err

TENSORS = ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "A_log", "dt_bias")


def both(args, **opts):
    """(chunk result, recurrent result) of the reference on the same inputs."""
    tensors = {name: args.get(name) for name in TENSORS}
    options = KDAOptions(scale=args["q"].shape[-1] ** -0.5, **opts)
    chunk = kda_reference(**tensors, opts=options, algorithm="chunk")
    recurrent = kda_reference(**tensors, opts=options, algorithm="recurrent")
    return chunk, recurrent


def assert_same(chunk, recurrent, tol=1e-10):
    for a, b, what in zip(chunk, recurrent, ("output", "final state")):
        err = rel_err(a, b)
        assert err < tol, f"{what}: relative error {err:.3e} >= {tol}"


@pytest.mark.parametrize("T", [1, 17, 64, 100, 129])
@pytest.mark.parametrize("chunk_size", [32, 64])
def test_chunk_equals_recurrence_ragged(T, chunk_size):
    args = make_inputs(B=2, T=T, H=2, K=16, V=8)
    assert_same(*both(args, chunk_size=chunk_size))


@pytest.mark.parametrize("cu", [[0, 1, 40, 40, 113], [0, 65], [0, 30, 31], [0, 0, 0, 50]])
def test_chunk_equals_recurrence_varlen(cu):
    args = make_inputs(H=2, K=16, V=16, cu_seqlens=cu)
    assert_same(*both(args))


@pytest.mark.parametrize("H,HV", [(1, 4), (2, 4), (2, 6)])
def test_chunk_equals_recurrence_grouped_value_heads(H, HV):
    args = make_inputs(B=2, T=50, H=H, HV=HV, K=8, V=12)
    assert_same(*both(args))


@pytest.mark.parametrize("flags", [
    dict(use_qk_l2norm_in_kernel=True),
    dict(use_gate_in_kernel=True),
    dict(use_gate_in_kernel=True, lower_bound=-5.0),
    dict(use_beta_sigmoid_in_kernel=True),
    dict(use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True),
    dict(state_v_first=True),
])
def test_chunk_equals_recurrence_prologue_flags(flags):
    args = make_inputs(B=2, T=77, H=2, K=16, V=16, gate="raw" if flags.get("use_gate_in_kernel") else "log",
                       beta_logits=flags.get("use_beta_sigmoid_in_kernel", False),
                       state_v_first=flags.get("state_v_first", False))
    assert_same(*both(args, **flags))


def test_without_initial_state():
    args = make_inputs(B=1, T=40, initial_state=False)
    assert_same(*both(args))


def test_recurrence_matches_a_hand_written_step():
    """One token from a known state, written out with plain matrix algebra."""
    args = make_inputs(B=1, T=1, H=1, K=4, V=3)
    q, k, v, g, beta, S = (args[n][0, 0, 0] if n != "initial_state" else args[n][0, 0]
                           for n in ("q", "k", "v", "g", "beta", "initial_state"))
    S1 = torch.diag(g.exp()) @ S
    S1 = (torch.eye(4, dtype=S.dtype) - beta * torch.outer(k, k)) @ S1 + beta * torch.outer(k, v)
    o = 4 ** -0.5 * S1.T @ q
    out, final = kda_reference(**{n: args[n] for n in ("q", "k", "v", "g", "beta", "initial_state")},
                               algorithm="recurrent")
    assert rel_err(out[0, 0, 0], o) < 1e-14 and rel_err(final[0, 0], S1) < 1e-14


def test_causality_output_and_gradient():
    """Changing token t's inputs never changes an earlier output or an earlier input's gradient."""
    args = make_inputs(B=1, T=90, K=8, V=8, gate="raw", requires_grad=True)
    opts = KDAOptions(scale=8 ** -0.5, use_gate_in_kernel=True, lower_bound=-5.0)
    tensors = {n: args.get(n) for n in TENSORS}
    o1, _ = kda_reference(**tensors, opts=opts)
    (o1[:, :50].sum()).backward()
    grad1 = args["k"].grad[:, :50].clone()
    later = {n: (x.detach().clone() if isinstance(x, torch.Tensor) else x) for n, x in tensors.items()}
    for n in ("q", "k", "v", "g", "beta"):
        later[n][:, 50:] = torch.randn_like(later[n][:, 50:])
        later[n].requires_grad_(True)
    o2, _ = kda_reference(**later, opts=opts)
    (o2[:, :50].sum()).backward()
    assert torch.equal(o1[:, :50], o2[:, :50])
    assert torch.allclose(grad1, later["k"].grad[:, :50], rtol=0, atol=1e-15)


def test_batch_invariance_in_varlen_pack():
    """A sequence's output does not depend on its neighbours in the pack."""
    alone = make_inputs(H=2, K=8, V=8, cu_seqlens=[0, 45])
    other = make_inputs(H=2, K=8, V=8, cu_seqlens=[0, 30])
    packed = {n: torch.cat([other[n], alone[n]], 1) for n in ("q", "k", "v", "g", "beta")}
    packed["initial_state"] = torch.cat([other["initial_state"], alone["initial_state"]])
    packed["cu_seqlens"] = torch.tensor([0, 30, 75])
    o_alone, s_alone = kda_reference(**{n: alone.get(n) for n in TENSORS})
    o_pack, s_pack = kda_reference(**{n: packed.get(n) for n in TENSORS})
    assert rel_err(o_pack[:, 30:], o_alone) < 1e-13
    assert rel_err(s_pack[1], s_alone[0]) < 1e-13


def test_very_low_gates_stay_finite():
    """Gates of -1000 (masked positions) must not produce inf/NaN anywhere (no exp(-Gamma))."""
    args = make_inputs(B=1, T=100, K=8, V=8)
    args["g"][:, 10:60] = -1000.0
    chunk, recurrent = both(args)
    assert all(torch.isfinite(x).all() for x in chunk)
    assert_same(chunk, recurrent)


def test_float32_inputs_close_to_float64():
    args64 = make_inputs(B=2, T=200, H=2, K=32, V=32)
    args32 = {n: (x.float() if x.is_floating_point() else x) for n, x in args64.items()}
    ref = kda_reference(**{n: args64.get(n) for n in TENSORS}, algorithm="recurrent")
    out = kda_reference(**{n: args32.get(n) for n in TENSORS})
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert rel_err(out[0], ref[0]) < 1e-5 and rel_err(out[1], ref[1]) < 1e-5


def test_chunk_states_are_the_states_entering_each_chunk():
    args = make_inputs(H=2, K=8, V=8, cu_seqlens=[0, 70, 100])
    tensors = {n: args.get(n) for n in TENSORS}
    o, final, h = kda_reference_chunk_states(**tensors, opts=KDAOptions(scale=8 ** -0.5, chunk_size=32))
    assert h.shape == (1, 3 + 1, 2, 8, 8)  # 70 tokens -> 3 chunks, 30 tokens -> 1 chunk
    assert torch.allclose(h[0, 0], args["initial_state"][0]) and torch.allclose(h[0, 3], args["initial_state"][1])
    # The state entering chunk 2 of sequence 0 is the final state after its first 64 tokens.
    first64 = {n: (x[:, :64] if n in ("q", "k", "v", "g", "beta") else x) for n, x in tensors.items()}
    first64["cu_seqlens"], first64["initial_state"] = None, args["initial_state"][:1]
    _, s64 = kda_reference(**first64)
    assert rel_err(h[0, 2], s64[0]) < 1e-13
