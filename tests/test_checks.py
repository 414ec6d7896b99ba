"""Every bad input raises a ValueError/TypeError that names the argument and what was expected."""
import subprocess
import sys
import warnings

import pytest
import torch

from kda_compile import checks, chunk_kda, explain, fused_recurrent_kda

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
    ("chunk size", {}, dict(chunk_size=48), ValueError, "`chunk_size` must be either 32 or 64 for KDA, got 48."),
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
    ("cp_context of the wrong type", {}, dict(cp_context=object()), TypeError, "cp_context must be a KDAContext"),
    ("FLA graph mode", {}, dict(use_graph=True), ValueError, "use_graph"),
    ("FLA max_num_seqs", {}, dict(max_num_seqs=4), ValueError, "max_num_seqs"),
    ("unknown keyword", {}, dict(not_an_argument=1), TypeError, "not_an_argument"),
    ("backend type", {}, dict(backend=3), TypeError, "backend must be a string"),
    ("unknown backend", {}, dict(backend="cuda-magic"), ValueError, "backend 'cuda-magic' is not available"),
]


@pytest.mark.parametrize("desc,override,extra,error,text", BAD, ids=[b[0] for b in BAD])
def test_bad_input_chunk(desc, override, extra, error, text):
    with pytest.raises(error) as info:
        call(chunk_kda, base(**override), **extra)
    assert text in str(info.value), f"message {str(info.value)!r} lacks {text!r}"


CHUNK_ONLY = ("chunk size", "safe gate without bound", "safe gate out of range", "cp_context of the wrong type")
RECURRENT_BAD = [b for b in BAD if b[0] not in CHUNK_ONLY] + [
    ("FLA context parallel", {}, dict(cp_context=object()), ValueError, "cp_context")]


@pytest.mark.parametrize("desc,override,extra,error,text", RECURRENT_BAD, ids=[b[0] for b in RECURRENT_BAD])
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
    with pytest.raises(ValueError, match="`chunk_size` must be either 32 or 64 for KDA, got 16."):
        explain(args["q"], args["k"], args["v"], args["g"], args["beta"], chunk_size=16)


# ------------------------------------------------------------------------------------ FLA compatibility

@pytest.mark.parametrize("fn", [chunk_kda, fused_recurrent_kda, explain])
def test_fla_only_keywords_at_their_defaults_are_accepted(fn):
    """FLA 0.6.0's defaults: cp_context=None, use_graph=False, max_num_seqs=None."""
    args = base()
    expected = call(fn, args)
    got = call(fn, args, cp_context=None, use_graph=False, max_num_seqs=None)
    if fn is explain:
        assert got.backend.name == expected.backend.name
    else:
        assert torch.equal(got[0], expected[0])


@pytest.mark.parametrize("fn", [chunk_kda, fused_recurrent_kda])
def test_legacy_transpose_state_layout_is_state_v_first(fn):
    args = base()
    args["initial_state"] = args["initial_state"].transpose(-1, -2).contiguous()   # [N, HV, V, K]
    want = call(fn, args, state_v_first=True, output_final_state=True)
    with pytest.warns(DeprecationWarning, match="`transpose_state_layout` is deprecated and renamed to "
                                                "`state_v_first`"):
        got = call(fn, args, transpose_state_layout=True, output_final_state=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="Cannot pass both `state_v_first` and the deprecated "
                                         "`transpose_state_layout`."):
        call(fn, args, state_v_first=True, transpose_state_layout=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # without the legacy keyword, no warning
        call(fn, args, state_v_first=True)


# ------------------------------------------------------------------------------------ content checks

def test_debug_flag_is_read_from_the_environment_at_import():
    code = "from kda_compile import checks; print(checks.DEBUG)"
    for value, expected in (("1", "True"), ("0", "False"), ("", "False")):
        env = {"KDA_COMPILE_DEBUG": value, "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, (value, out.stdout, out.stderr)


@pytest.fixture
def on_a_device(monkeypatch):
    """Pretend every tensor lives on a GPU: reading values would need a device sync."""
    monkeypatch.setattr(checks, "_values_are_free", lambda x: False)


@pytest.mark.parametrize("bad", [0.5, float("inf"), float("nan")])
def test_gate_values_are_checked_only_in_debug_mode(monkeypatch, bad):
    args = base()
    args["g"] = args["g"].clone()
    args["g"][1, 7, 0, 3] = bad
    monkeypatch.setattr(checks, "DEBUG", False)
    call(explain, args)                                   # not read: no sync on the hot path
    monkeypatch.setattr(checks, "DEBUG", True)
    for fn in (chunk_kda, fused_recurrent_kda, explain):
        with pytest.raises(ValueError, match="NaN" if bad != bad else "g must be <= 0"):
            call(fn, args)
    call(explain, base())                                 # a valid g passes the debug check
    raw = make_inputs(B=B, T=T, H=H, K=K, V=V, dtype=torch.float32, gate="raw")
    call(explain, raw, use_gate_in_kernel=True)           # a raw gate may be positive


def test_offsets_and_pool_indices_on_a_device_are_checked_only_in_debug_mode(monkeypatch, on_a_device):
    bad_offsets = packed(torch.tensor([0, 12, 5, T]))
    pool_args = base(initial_state=torch.zeros(5, H, K, V))
    bad_slots = dict(ssm_state_indices=torch.tensor([0, 7]))
    bad_accepted = dict(ssm_state_indices=torch.tensor([[0, 1], [2, 3]]), num_accepted_tokens=torch.tensor([0, 1]))
    monkeypatch.setattr(checks, "DEBUG", False)
    call(explain, bad_offsets)
    call(explain, pool_args, op="recurrent", **bad_slots)
    call(explain, pool_args, op="recurrent", **bad_accepted)
    with pytest.raises(ValueError, match="non-decreasing"):   # free with cu_seqlens_cpu: always checked
        call(explain, bad_offsets, cu_seqlens_cpu=bad_offsets["cu_seqlens"].clone())
    monkeypatch.setattr(checks, "DEBUG", True)
    with pytest.raises(ValueError, match="non-decreasing"):
        call(explain, bad_offsets)
    with pytest.raises(ValueError, match="ssm_state_indices must lie in"):
        call(fused_recurrent_kda, pool_args, **bad_slots)
    with pytest.raises(ValueError, match="num_accepted_tokens must lie in"):
        call(fused_recurrent_kda, pool_args, **bad_accepted)


@pytest.mark.gpu
def test_hot_path_checks_do_not_sync_the_device(monkeypatch):
    """Without the debug flag, checking a dense call and a pooled decode call never waits for the GPU."""
    monkeypatch.setattr(checks, "DEBUG", False)
    args = make_inputs(B=B, T=T, H=H, K=K, V=V, dtype=torch.bfloat16, device="cuda")
    pool = torch.zeros(5, H, K, V, device="cuda")
    slots = torch.tensor([0, 3], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        problem = checks.check_inputs(*(args[n] for n in ("q", "k", "v", "g", "beta")),
                                      initial_state=args["initial_state"])
        checks.check_serving(problem, pool, slots, None, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
