"""The torch.library custom ops: opcheck, gradients (gradcheck in float64), torch.compile without breaks."""
import dataclasses

import pytest
import torch

from kda_compile import chunk_kda, explain, fused_recurrent_kda
from kda_compile.api import _options
from kda_compile.reference import KDAOptions

from kda_inputs import make_inputs, rel_err

OPS = torch.ops.kda_compile


def op_args(args, **flags):
    """Positional arguments of the kda_compile ops for an inputs dict."""
    opts = _options(args["q"], None, flags.get("use_qk_l2norm_in_kernel", False),
                    flags.get("use_gate_in_kernel", False), flags.get("use_beta_sigmoid_in_kernel", False), False,
                    flags.get("lower_bound"), 64, False)
    tensors = tuple(args.get(n) for n in ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "A_log",
                                          "dt_bias"))
    return tensors, opts.as_op_args()


CASES = [
    dict(make=dict(B=2, T=19, H=1, HV=2, K=8, V=4), flags={}),
    dict(make=dict(H=2, K=8, V=8, cu_seqlens=[0, 5, 21], gate="raw", beta_logits=True),
         flags=dict(use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, use_qk_l2norm_in_kernel=True)),
    dict(make=dict(B=1, T=9, K=4, V=4, initial_state=False), flags={}),
]


@pytest.mark.parametrize("case", CASES, ids=["gva", "varlen-prologues", "no-state"])
def test_opcheck_forward_ops(case):
    args = make_inputs(dtype=torch.float64, requires_grad=True, **case["make"])
    tensors, options = op_args(args, **case["flags"])
    torch.library.opcheck(OPS.chunk_kda_fwd.default, (*tensors, *options, True, ""))
    torch.library.opcheck(OPS.recurrent_kda_fwd.default, (*tensors, None, None, *options, True, ""))


def test_opcheck_inplace_and_backward_ops():
    args = make_inputs(B=2, T=1, K=8, V=8, dtype=torch.float32)
    tensors, options = op_args(args)
    torch.library.opcheck(OPS.recurrent_kda_inplace.default,
                          (*tensors[:5], args["initial_state"].clone(), None, None, None, None, None, *options, ""))
    args = make_inputs(B=1, T=12, K=8, V=8, dtype=torch.float64)
    tensors, options = op_args(args)
    grad_o = torch.randn_like(args["v"])
    for backend in ("", "reference"):
        torch.library.opcheck(OPS.kda_bwd.default, (grad_o, None, *tensors, [], *options, backend))
        torch.library.opcheck(OPS.chunk_kda_fwd_train.default, (*tensors, *options, True, backend))
    for backend in ("", "reference"):
        torch.library.opcheck(OPS.chunk_kda_fwd_states.default, (*tensors, *options, backend))


# ---------------------------------------------------------------------------------- options across the ops

OPTION_OPS = ("chunk_kda_fwd", "chunk_kda_fwd_train", "chunk_kda_fwd_states", "recurrent_kda_fwd", "recurrent_kda_inplace",
              "kda_bwd")


@pytest.mark.parametrize("name", OPTION_OPS)
def test_every_op_takes_the_options_in_the_dataclass_order(name):
    """The registered schemas carry KDAOptions' fields, in field order, with matching types, as one run."""
    arguments = OPS.__getattr__(name).default._schema.arguments
    names = [a.name for a in arguments]
    fields = [f.name for f in dataclasses.fields(KDAOptions)]
    start = names.index(fields[0])
    assert names[start:start + len(fields)] == fields
    types = [str(a.type) for a in arguments[start:start + len(fields)]]
    expected = {"float": "float", "bool": "bool", "int": "int", "float?": "Optional[float]"}
    for part, got in zip(KDAOptions.op_schema().split(", "), types):
        assert expected[part.split()[0]] == got, (part, got)


def test_options_round_trip_through_op_arguments():
    opts = KDAOptions(scale=0.25, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, lower_bound=-3.0,
                      chunk_size=32, state_v_first=True)
    args = opts.as_op_args()
    assert len(args) == KDAOptions.op_arg_count() == len(dataclasses.fields(KDAOptions))
    assert KDAOptions.from_op_args(args) == opts
    assert KDAOptions.from_op_args(list(args)) == opts
    with pytest.raises(TypeError, match="takes 8 values"):
        KDAOptions.from_op_args(args[:-1])


def test_non_default_options_reach_the_backend_intact():
    """Every option, set to a non-default value, arrives in the backend's KDACall unchanged (eager and
    through the op's autograd path)."""
    from kda_compile import dispatch
    from kda_compile.reference_backend import run_reference
    seen = []

    def run(call, config):
        seen.append(call.opts)
        return run_reference(call, config)

    dispatch.register_backend(dispatch.Backend(name="spy", supports=lambda call: None, run=run))
    try:
        args = make_inputs(B=1, T=10, H=1, K=4, V=4, dtype=torch.float64, gate="raw", beta_logits=True,
                           state_v_first=True)
        q, k, v, g, beta = (args[n] for n in ("q", "k", "v", "g", "beta"))
        chunk_kda(q, k, v, g, beta, scale=0.3, initial_state=args["initial_state"], use_qk_l2norm_in_kernel=True,
                  use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True,
                  lower_bound=-2.0, state_v_first=True, chunk_size=32, A_log=args["A_log"], backend="spy")
    finally:
        dispatch.unregister_backend("spy")
    assert seen == [KDAOptions(scale=0.3, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                               use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True, lower_bound=-2.0,
                               chunk_size=32, state_v_first=True)]


@pytest.mark.parametrize("fn", ["chunk", "recurrent"])
@pytest.mark.parametrize("gate", ["log", "raw"])
def test_gradcheck_float64(fn, gate):
    args = make_inputs(B=1, T=6, H=1, HV=2, K=3, V=2, gate=gate, beta_logits=gate == "raw", requires_grad=True)
    flags = dict(use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, use_qk_l2norm_in_kernel=True) \
        if gate == "raw" else {}
    names = [n for n in ("q", "k", "v", "g", "beta", "initial_state", "A_log", "dt_bias") if n in args]
    f = chunk_kda if fn == "chunk" else fused_recurrent_kda

    def run(*xs):
        a = dict(zip(names, xs))
        q, k, v, g, beta = (a.pop(n) for n in ("q", "k", "v", "g", "beta"))
        kwargs = dict(initial_state=a.get("initial_state"), output_final_state=True, A_log=a.get("A_log"),
                      dt_bias=a.get("dt_bias"), **flags)
        if fn == "chunk":
            kwargs["chunk_size"] = 32
        return f(q, k, v, g, beta, **kwargs)

    assert torch.autograd.gradcheck(run, tuple(args[n] for n in names), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradients_equal_autograd_through_the_recurrence():
    """The backward op equals plain autograd through the token loop (an independent derivation)."""
    from kda_compile.reference import KDAOptions, kda_reference
    args = make_inputs(B=2, T=40, H=2, K=8, V=8, requires_grad=True)
    names = ("q", "k", "v", "g", "beta", "initial_state")
    o, s = chunk_kda(*(args[n] for n in names[:5]), initial_state=args["initial_state"], output_final_state=True)
    (o.square().sum() + s.sum()).backward()
    ours = [args[n].grad.clone() for n in names]
    for n in names:
        args[n].grad = None
    o, s = kda_reference(*(args[n] for n in names), opts=KDAOptions(scale=8 ** -0.5), algorithm="recurrent")
    (o.square().sum() + s.sum()).backward()
    for n, mine in zip(names, ours):
        assert rel_err(mine, args[n].grad) < 1e-10, n


def test_torch_compile_fullgraph_no_breaks():
    args = make_inputs(B=2, T=21, H=2, K=8, V=8, dtype=torch.float32, gate="raw", beta_logits=True)
    flags = dict(use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, use_qk_l2norm_in_kernel=True,
                 A_log=args["A_log"], dt_bias=args["dt_bias"])

    def f(q, k, v, g, beta, h0):
        o, s = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, **flags)
        o1, s1 = fused_recurrent_kda(q[:, -1:], k[:, -1:], v[:, -1:], g[:, -1:], beta[:, -1:], initial_state=s,
                                     output_final_state=True, **flags)
        return o, o1, s1

    inputs = tuple(args[n] for n in ("q", "k", "v", "g", "beta", "initial_state"))
    assert torch._dynamo.explain(f)(*inputs).graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(*inputs), f(*inputs)):
        assert rel_err(got, want) < 1e-6


def test_forward_backend_forces_the_backward(monkeypatch):
    """backend= on the forward call reaches the backward: the dispatch is asked for that backend's gradients."""
    from kda_compile import chunk_kda, dispatch
    seen = []
    real = dispatch.run_backward

    def spy(call, do, dht, backend=None, kept=()):
        seen.append(backend)
        return real(call, do, dht, backend, kept)

    monkeypatch.setattr(dispatch, "run_backward", spy)
    args = make_inputs(B=1, T=20, K=8, V=8, dtype=torch.float32, requires_grad=True)
    o, _ = chunk_kda(args["q"], args["k"], args["v"], args["g"], args["beta"], initial_state=args["initial_state"],
                     backend="reference")
    o.sum().backward()
    assert seen == ["reference"] and args["q"].grad is not None


def test_backward_choice_falls_back_with_the_reason():
    """A forward backend without a backward for the call leaves the gradients to one that has one; explain's
    backward choice names the reason."""
    from kda_compile import dispatch
    from kda_compile.checks import Problem
    fake = dispatch.Backend(name="fwd_only", supports=lambda call: None, run=lambda call, config: None)
    dispatch.register_backend(fake, before="reference")
    try:
        args = make_inputs(B=1, T=5, K=8, V=8, dtype=torch.float32)
        problem = Problem(1, 5, 1, 1, 8, 8, 1, False, torch.float32, torch.device("cpu"))
        call = dispatch.KDACall("chunk", problem, KDAOptions(scale=8 ** -0.5), args["q"], args["k"], args["v"],
                                args["g"], args["beta"])
        choice = dispatch.choose_backward(call, "fwd_only")
        assert choice.backend.name != "fwd_only" and "no backward" in choice.rejected["fwd_only"]
    finally:
        dispatch.unregister_backend("fwd_only")


def test_triton_backward_refuses_float32_accurate_products_on_a_gpu():
    """The Triton backward leaves float32 GPU calls under 'highest' matmul precision to the next backend, with
    the reason (its solve kernel faults there); TF32 products, other dtypes and the CPU interpreter are not refused."""
    from kda_compile import dispatch
    from kda_compile.checks import Problem
    from kda_compile.kernels_triton.backend import TRITON_BACKEND
    args = make_inputs(B=1, T=5, K=16, V=16, dtype=torch.float32)
    gpu = Problem(1, 5, 1, 1, 16, 16, 1, False, torch.float32, torch.device("cuda"))

    def reason(problem):
        call = dispatch.KDACall("chunk", problem, KDAOptions(scale=0.25), args["q"], args["k"], args["v"],
                                args["g"], args["beta"])
        return TRITON_BACKEND.supports_backward(call)

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert "'highest'" in reason(gpu) and "set_float32_matmul_precision('high')" in reason(gpu)
        assert reason(gpu._replace(dtype=torch.bfloat16)) is None
        assert reason(gpu._replace(device=torch.device("cpu"))) is None
        torch.set_float32_matmul_precision("high")
        assert reason(gpu) is None
    finally:
        torch.set_float32_matmul_precision(before)


def _triton_runs_here():
    import importlib.util
    import os
    return importlib.util.find_spec("triton") is not None and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not _triton_runs_here(), reason="Triton needs a GPU or its interpreter (conftest turns it on "
                                                     "without a GPU)")
def test_training_forward_keeps_what_its_backward_reads(monkeypatch):
    """Under autograd the Triton forward keeps X and aqk, the backward receives them, and the gradients equal,
    bit for bit, those of the backward that forms them again; eager and under torch.compile(fullgraph=True).
    The reference keeps nothing."""
    from kda_compile import dispatch
    from kda_compile.kernels_triton.chunk_bwd import chunk_kda_bwd
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # float32 in the interpreter; bfloat16 on a GPU, where float32 under 'highest' is not the Triton backward's
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args = make_inputs(B=1, T=45, H=1, HV=2, K=16, V=16, dtype=dtype, device=device)
    args["initial_state"] = args["initial_state"].float()
    names = ("q", "k", "v", "g", "beta", "initial_state")
    do = torch.randn_like(args["v"])
    seen = []
    real = dispatch.run_backward

    def spy(call, do, dht, backend=None, kept=()):
        seen.append([tuple(t.shape) for t in kept])
        return real(call, do, dht, backend, kept)

    monkeypatch.setattr(dispatch, "run_backward", spy)

    def step(backend, fn=chunk_kda):
        leaves = {n: args[n].clone().requires_grad_(True) for n in names}
        o, _ = fn(**leaves, backend=backend)
        o.backward(do)
        return [leaves[n].grad for n in names]

    eager = step("triton")
    TT, C = 45, 64
    assert seen == [[(TT, 2, C), (TT, 2, C)]]
    opts = _options(args["q"], None, False, False, False, False, None, 64, False)
    config = explain(**args, op="chunk_backward", backend="triton").config  # a GPU's tables may tune it
    want = chunk_kda_bwd(*(args[n] for n in names), None, None, None, opts, do, None, config)
    for n, got, ref in zip(names, eager, want):
        assert torch.equal(got, ref), f"d{n} differs from the recomputing backward"
    compiled = step("triton", torch.compile(chunk_kda, fullgraph=True))
    assert seen[-1] == [(TT, 2, C), (TT, 2, C)]
    for n, got, ref in zip(names, compiled, eager):
        assert torch.equal(got, ref), f"d{n} differs under torch.compile"
    step("reference")
    assert seen[-1] == []
    leaves = {n: args[n] for n in names}
    assert "under autograd the forward runs on 'triton': it keeps" in explain(
        **leaves, op="chunk_backward", backend="triton").reason
    assert "under autograd" not in explain(**leaves, op="chunk_backward", backend="reference").reason


def test_training_backend_follows_the_dispatch_rules(monkeypatch):
    """The backend whose forward keeps tensors under autograd: the first of the default order that runs the call's
    forward and backward, or the one named; never one the tables found unfit unless named with backend=."""
    from kda_compile import dispatch, tuning_table
    from kda_compile.checks import Problem
    from kda_compile.reference_backend import run_reference, run_reference_backward
    keeper = dispatch.Backend(name="keeper", supports=lambda call: None, run=run_reference,
                              run_backward=run_reference_backward,
                              run_training=lambda call, config: (*run_reference(call, config), []))
    dispatch.register_backend(keeper, before="reference")
    monkeypatch.delenv("KDA_COMPILE_BACKEND", raising=False)
    try:
        args = make_inputs(B=1, T=5, K=8, V=8, dtype=torch.float32)
        problem = Problem(1, 5, 1, 1, 8, 8, 1, False, torch.float32, torch.device("cpu"))
        call = dispatch.KDACall("chunk", problem, KDAOptions(scale=8 ** -0.5), args["q"], args["k"], args["v"],
                                args["g"], args["beta"])
        assert dispatch.training_backend(call) is dispatch.get_backend("keeper")
        assert dispatch.training_backend(call, "reference") is None          # named: no training forward
        monkeypatch.setenv("KDA_COMPILE_BACKEND", "keeper")
        assert dispatch.training_backend(call) is dispatch.get_backend("keeper")
        monkeypatch.setattr(tuning_table, "unfit_backends", lambda call, op=None: {"keeper": "outside tolerance"})
        assert dispatch.training_backend(call) is None                      # unfit: not by the environment
        monkeypatch.delenv("KDA_COMPILE_BACKEND")
        assert dispatch.training_backend(call) is None                      # nor unnamed
        assert dispatch.training_backend(call, "keeper") is dispatch.get_backend("keeper")   # backend= wins
    finally:
        dispatch.unregister_backend("keeper")
