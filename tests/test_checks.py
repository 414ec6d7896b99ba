"""Every bad input raises a ValueError/TypeError that names the argument and what was expected."""
import pytest
import torch

from kda_compile import chunk_kda, explain, fused_recurrent_kda

from kda_inputs import make_inputs

B, T, H, K, V = 2, 20, 2, 8, 8


def base(**kw):
    args = make_inputs(B=B, T=T, H=H, K=K, V=V, dtype=torch.float32)
    args.update(kw)
    return args


def call(fn, args, **kw):
    a = dict(args)
    q, k, v, g, beta = (a.pop(n) for n in ("q", "k", "v", "g", "beta"))
    return fn(q, k, v, g, beta, **a, **kw)


BAD = [
    # (description, overrides, extra kwargs, error type, text that must appear in the message)
    ("q rank", dict(q=torch.randn(B, T, H * K)), {}, ValueError, "q must have shape [B, T, H, K]"),
    ("k shape", dict(k=torch.randn(B, T, H, K + 1)), {}, ValueError, "k must have shape"),
    ("v batch", dict(v=torch.randn(B + 1, T, H, V)), {}, ValueError, "v must have shape [B, T, HV, V]"),
    ("H not dividing HV", dict(v=torch.randn(B, T, 3, V)), {}, ValueError, "multiple of the key heads"),
    ("g shape", dict(g=torch.randn(B, T, H, K - 1)), {}, ValueError, "g must have shape [B, T, HV, K]"),
    ("beta shape", dict(beta=torch.rand(B, T)), {}, ValueError, "beta must have shape [B, T, HV]"),
    ("q dtype int", dict(q=torch.ones(B, T, H, K, dtype=torch.int32)), {}, TypeError, "q must be float16"),
    ("mixed dtypes", dict(k=torch.randn(B, T, H, K, dtype=torch.float64)), {}, TypeError, "share one dtype"),
    ("not a tensor", dict(v=[[1.0]]), {}, TypeError, "v must be a torch.Tensor"),
    ("device mix", dict(g=torch.randn(B, T, H, K, device="meta")), {}, ValueError, "g is on meta"),
    ("state shape", dict(initial_state=torch.zeros(B, H, K, V + 1)), {}, ValueError,
     "initial_state must have shape [N, HV, K, V]"),
    ("state count", dict(initial_state=torch.zeros(B + 1, H, K, V)), {}, ValueError, "initial_state"),
    ("state dtype", dict(initial_state=torch.zeros(B, H, K, V, dtype=torch.bfloat16)), {}, TypeError,
     "initial_state must be float32"),
    ("chunk size", {}, dict(chunk_size=48), ValueError, "chunk_size must be 32 or 64"),
    ("neg eigval without sigmoid", {}, dict(allow_neg_eigval=True), ValueError, "use_beta_sigmoid_in_kernel"),
    ("gate without A_log", {}, dict(use_gate_in_kernel=True), ValueError, "A_log"),
    ("A_log shape", dict(A_log=torch.zeros(H + 1)), dict(use_gate_in_kernel=True), ValueError,
     "A_log must have shape [HV]"),
    ("dt_bias shape", dict(A_log=torch.zeros(H), dt_bias=torch.zeros(H)), dict(use_gate_in_kernel=True),
     ValueError, "dt_bias must have shape [HV * K]"),
    ("safe gate without bound", dict(A_log=torch.zeros(H)), dict(use_gate_in_kernel=True, safe_gate=True),
     ValueError, "lower_bound"),
    ("safe gate out of range", dict(A_log=torch.zeros(H)),
     dict(use_gate_in_kernel=True, safe_gate=True, lower_bound=-7.0), ValueError, "[-5, 0)"),
    ("FLA-only keyword", {}, dict(cp_context=object()), ValueError, "cp_context"),
    ("unknown keyword", {}, dict(not_an_argument=1), TypeError, "not_an_argument"),
    ("backend type", {}, dict(backend=3), TypeError, "backend must be a string"),
    ("unknown backend", {}, dict(backend="cuda-magic"), ValueError, "backend 'cuda-magic' is not available"),
]


@pytest.mark.parametrize("desc,override,extra,error,text", BAD, ids=[b[0] for b in BAD])
def test_bad_input_chunk(desc, override, extra, error, text):
    with pytest.raises(error) as info:
        call(chunk_kda, base(**override), **extra)
    assert text in str(info.value), f"message {str(info.value)!r} lacks {text!r}"


@pytest.mark.parametrize("desc,override,extra,error,text",
                         [b for b in BAD if b[0] not in ("chunk size", "safe gate without bound",
                                                        "safe gate out of range")],
                         ids=[b[0] for b in BAD if b[0] not in ("chunk size", "safe gate without bound",
                                                               "safe gate out of range")])
def test_bad_input_recurrent(desc, override, extra, error, text):
    with pytest.raises(error) as info:
        call(fused_recurrent_kda, base(**override), **extra)
    assert text in str(info.value)


def packed(cu):
    args = make_inputs(H=H, K=K, V=V, dtype=torch.float32, cu_seqlens=[0, T], initial_state=False)
    args["cu_seqlens"] = cu
    return args


@pytest.mark.parametrize("cu,text", [
    (torch.tensor([0, 12, 5, T]), "non-decreasing"),
    (torch.tensor([2, 10, T]), "start at 0"),
    (torch.tensor([0, 10, T - 1]), "end at T"),
    (torch.tensor([0, 10.0, T]), "int32 or int64"),
    (torch.tensor([[0, T]]), "cu_seqlens must have shape [N + 1]"),
    (torch.tensor([0]), "N >= 1"),
])
def test_bad_cu_seqlens(cu, text):
    with pytest.raises((ValueError, TypeError)) as info:
        call(chunk_kda, packed(cu))
    assert text in str(info.value)


def test_cu_seqlens_needs_batch_one():
    args = base(cu_seqlens=torch.tensor([0, 5, T]), initial_state=None)
    with pytest.raises(ValueError, match="batch size B must be 1"):
        call(chunk_kda, args)


def test_state_count_must_match_sequences():
    args = packed(torch.tensor([0, 5, T]))
    args["initial_state"] = torch.zeros(3, H, K, V)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, HV, K, V\] = \[2"):
        call(chunk_kda, args)


def test_state_v_first_layout_is_checked():
    with pytest.raises(ValueError, match=r"\[N, HV, V, K\]"):
        call(chunk_kda, base(initial_state=torch.zeros(B, H, K, V + 1)), state_v_first=True)


def test_serving_arguments_are_checked():
    args = base(initial_state=torch.zeros(5, H, K, V))
    with pytest.raises(ValueError, match="ssm_state_indices must lie in"):
        call(fused_recurrent_kda, args, ssm_state_indices=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"ssm_state_indices must have shape \[N\]"):
        call(fused_recurrent_kda, args, ssm_state_indices=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="num_accepted_tokens must lie in"):
        call(fused_recurrent_kda, args, ssm_state_indices=torch.tensor([[0, 1], [2, 3]]),
             num_accepted_tokens=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="inplace_final_state=True needs initial_state"):
        call(fused_recurrent_kda, base(initial_state=None), inplace_final_state=True)


def test_explain_checks_too():
    args = base()
    with pytest.raises(ValueError, match="op must be one of"):
        explain(args["q"], args["k"], args["v"], args["g"], args["beta"], op="backward")
    with pytest.raises(ValueError, match="chunk_size must be 32 or 64"):
        explain(args["q"], args["k"], args["v"], args["g"], args["beta"], chunk_size=16)
