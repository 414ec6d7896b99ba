"""The ``kda_compile::KDA`` ONNX op on its own: its function bodies (chunkwise Loop, opset-27 LinearAttention)
run by onnxruntime against the float64 reference; schema and attribute checks; the export translation of a
bare KDA layer (missing inputs filled, state_v_first, safe gate) and its refusals."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

import kda_compile
from kda_compile.export import export_module, kda_node_model, node_attributes, op_schema, schema
from kda_compile.export.linear_attention_body import linear_attention_function
from kda_compile.reference import KDAOptions, kda_reference

from kda_inputs import make_inputs, rel_err

ACTIVATIONS = ("q", "k", "v", "g", "beta")
ONNX_TYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}
_SESSIONS = {}


def run_op(args, body="loop", dtype=torch.float32, **flags):
    """Run the one-node model on ``args`` (make_inputs output); returns float64 torch (o, final_state)."""
    K, HV = args["q"].shape[-1], args["v"].shape[2]
    key = (body, dtype, tuple(sorted(flags.items())), K)
    if key not in _SESSIONS:  # sessions are cheap, but the same model is reused across shapes
        model = kda_node_model(K ** -0.5, body=body, opset=27 if body == "linear_attention" else 20,
                               elem_type=ONNX_TYPE[dtype], **flags)
        _SESSIONS[key] = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {n: args[n].to(dtype).numpy() for n in ACTIVATIONS}
    B, K = args["q"].shape[0], args["q"].shape[-1]
    V = args["v"].shape[-1]
    state = args.get("initial_state")
    feed["initial_state"] = (state.float().numpy() if state is not None else np.zeros((B, HV, K, V), np.float32))
    feed["A_log"] = args["A_log"].float().numpy() if "A_log" in args else np.zeros(HV, np.float32)
    feed["dt_bias"] = args["dt_bias"].float().numpy() if "dt_bias" in args else np.zeros(HV * K, np.float32)
    o, final = _SESSIONS[key].run(None, feed)
    return torch.from_numpy(o.astype(np.float64)), torch.from_numpy(final.astype(np.float64))


def reference(args, dtype=torch.float32, **flags):
    """float64 reference on the inputs as the op sees them (activations rounded to ``dtype``)."""
    x = {n: args[n].to(dtype).double() for n in ACTIVATIONS}
    opts = KDAOptions(scale=args["q"].shape[-1] ** -0.5, **flags)
    return kda_reference(**x, initial_state=args.get("initial_state"), A_log=args.get("A_log"),
                         dt_bias=args.get("dt_bias"), opts=opts)


def assert_close(got, want, tol):
    for a, b, what in zip(got, want, ("output", "final state")):
        err = rel_err(a, b)
        assert err < tol, f"{what}: relative error {err:.3e} >= {tol}"


BODIES = ["loop", "linear_attention"]


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("chunk_size", [32, 64])
@pytest.mark.parametrize("T", [1, 17, 64, 100, 129])
def test_ragged_lengths_match_reference(body, chunk_size, T):
    args = make_inputs(B=2, T=T, H=2, K=16, V=8)
    assert_close(run_op(args, body, chunk_size=chunk_size), reference(args, chunk_size=chunk_size), 2e-5)


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("H,HV", [(1, 4), (2, 4), (2, 6)])
def test_grouped_value_heads(body, H, HV):
    args = make_inputs(B=2, T=50, H=H, HV=HV, K=8, V=12)
    assert_close(run_op(args, body), reference(args), 2e-5)


FLAGS = [
    dict(use_qk_l2norm_in_kernel=True),
    dict(use_gate_in_kernel=True),
    dict(use_gate_in_kernel=True, lower_bound=-5.0),
    dict(use_beta_sigmoid_in_kernel=True),
    dict(use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True),
    dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True),  # the model's
]


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "+".join(f))
def test_prologue_flags(body, flags):
    args = make_inputs(B=2, T=77, H=2, K=16, V=16, gate="raw" if flags.get("use_gate_in_kernel") else "log",
                       beta_logits=flags.get("use_beta_sigmoid_in_kernel", False))
    assert_close(run_op(args, body, **flags), reference(args, **flags), 2e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("body", BODIES)
def test_activation_dtypes(dtype, tol, body):
    args = make_inputs(B=1, T=70, H=2, HV=4, K=16, V=8)
    o, final = run_op(args, body, dtype=dtype)
    assert_close((o, final), reference(args, dtype=dtype), tol)


def test_without_initial_state_equals_zero_state():
    args = make_inputs(B=2, T=40, H=2, K=8, V=8, initial_state=False)
    assert_close(run_op(args), reference(args), 2e-5)


def test_very_negative_gates_stay_finite():
    """Masked positions carry gates near -1000: every exponent the body evaluates must stay <= 0.  (Within
    the chunk the float32 cumulative gate reaches -1e4, so differences Gamma_r - Gamma_s lose ~1e-3 in the
    exponent: the float32 PyTorch reference has the same limit, hence the looser tolerance here.)"""
    args = make_inputs(B=1, T=90, H=2, K=8, V=8)
    args["g"][:, 20:30] = -1000.0
    o, final = run_op(args)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    assert_close((o, final), reference(args), 2e-3)


def test_causality():
    """Changing a later token's inputs never changes an earlier output."""
    args = make_inputs(B=1, T=100, H=2, K=8, V=8)
    o1, _ = run_op(args)
    for name in ACTIVATIONS:
        args[name][:, 70:] = torch.randn_like(args[name][:, 70:])
    o2, _ = run_op(args)
    assert torch.equal(o1[:, :70], o2[:, :70])
    assert not torch.equal(o1[:, 70:], o2[:, 70:])


# --------------------------------------------------------------------------------------------- schema

def test_schema_and_function_pass_the_checker():
    s = op_schema()
    assert (s.domain, s.name, s.since_version) == ("kda_compile", "KDA", 1)
    assert [p.name for p in s.inputs] == list(schema.INPUTS) and [p.name for p in s.outputs] == list(schema.OUTPUTS)
    assert set(s.attributes) == set(schema.ATTRIBUTES)
    for body, opset in (("loop", 18), ("loop", 20), ("linear_attention", 27)):
        model = kda_node_model(0.25, body=body, opset=opset)   # checked inside (full_check)
        (fn,) = model.functions
        assert (fn.domain, fn.name) == ("kda_compile", "KDA")
        body_ops = {n.op_type for n in fn.node}
        assert ("Loop" in body_ops) == (body == "loop") and ("LinearAttention" in body_ops) == (body != "loop")
        assert all(n.domain in ("", "ai.onnx") for n in fn.node), "the body must use standard ops only"


def test_bad_attributes_and_bodies_are_refused():
    with pytest.raises(ValueError, match="chunk_size"):
        node_attributes(0.25, chunk_size=128)
    with pytest.raises(ValueError, match="lower_bound"):
        node_attributes(0.25, use_gate_in_kernel=True, lower_bound=1.0)
    with pytest.raises(ValueError, match="body"):
        kda_node_model(0.25, body="scan")
    with pytest.raises(ValueError, match="opset"):
        linear_attention_function(20)                    # LinearAttention exists from opset 27 on
    raised = kda_node_model(0.25, body="linear_attention", opset=20)  # the exporter raises the opset instead
    assert [o.version for o in raised.opset_import if o.domain == ""] == [27]


# ------------------------------------------------------------------------------- bare layer translation

class BareLayers(torch.nn.Module):
    """Three KDA calls exercising the translation: state_v_first, no state/no A_log/no final state, safe gate."""

    def forward(self, q, k, v, g, beta, h0):
        o1, s1 = kda_compile.chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                       state_v_first=True, chunk_size=32)
        o2, _ = kda_compile.chunk_kda(q, k, v, g, beta)
        o3, s3 = kda_compile.chunk_kda(q, k, v, g, beta, use_gate_in_kernel=True, safe_gate=True, lower_bound=-5.0,
                                       dt_bias=torch.full((v.shape[2] * q.shape[3],), 0.5), output_final_state=True)
        o4, s4 = kda_compile.fused_recurrent_kda(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1],
                                                 initial_state=h0.transpose(-1, -2).contiguous(),
                                                 output_final_state=True)
        return o1, s1, o2, o3, s3, o4, s4


def test_bare_layer_export_matches_pytorch():
    args = make_inputs(B=2, T=40, H=2, HV=4, K=16, V=8, dtype=torch.float32, state_v_first=True)
    tensors = tuple(args[n] for n in (*ACTIVATIONS, "initial_state"))
    model = export_module(BareLayers(), tensors)
    assert sum(n.domain == "kda_compile" and n.op_type == "KDA" for n in model.graph.node) == 4
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), tensors)})
    with torch.no_grad():
        want = BareLayers()(*tensors)
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(torch.from_numpy(a), b) < 1e-5, f"output {i}"


class Varlen(torch.nn.Module):
    def forward(self, q, k, v, g, beta):
        return kda_compile.chunk_kda(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 10, 40]))[0]


def test_varlen_export_is_refused_clearly():
    args = make_inputs(B=1, T=40, H=2, K=8, V=8, dtype=torch.float32)
    with pytest.raises(Exception, match="cu_seqlens"):
        export_module(Varlen(), tuple(args[n] for n in ACTIVATIONS))


def test_model_with_op_round_trips_through_file(tmp_path):
    path = tmp_path / "kda.onnx"
    onnx.save(kda_node_model(0.25), path)
    onnx.checker.check_model(str(path), full_check=True)
    assert onnx.load(path).functions[0].name == "KDA"
