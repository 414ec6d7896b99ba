"""Alternative body of ``kda_compile::KDA``: the prologue plus one standard opset-27 ``LinearAttention`` node.

ONNX opset 27's ``LinearAttention`` with ``update_rule="gated_delta"`` and a per-key decay input computes
``S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T``, ``o_t = scale S_t^T q_t`` -- the KDA
recurrence of docs/algorithm.md -- and onnxruntime >= 1.32 runs it natively.  Its grouping goes the other way
from ours (query heads a multiple of key/value heads), so the body folds the value heads into the batch axis
(``[B, T, HV, d] -> [B * HV, T, d]``, one head each) after repeating q/k to HV heads; no head counts need to be
known when the function is built.
"""
from __future__ import annotations

import onnx
from onnx import helper

from . import schema
from .builder import Nodes
from .function_body import _function, prologue

LINEAR_ATTENTION_OPSET = 27


def linear_attention_function(opset: int) -> onnx.FunctionProto:
    """``kda_compile::KDA`` whose body ends in one ``LinearAttention`` node (needs ``opset`` >= 27)."""
    if opset < LINEAR_ATTENTION_OPSET:
        raise ValueError(f"the linear_attention body needs default opset >= {LINEAR_ATTENTION_OPSET}, got {opset}")
    b = Nodes("kda_la_")
    p = prologue(b, {n: n for n in schema.INPUTS})
    B, T, HV, K, V = p["B"], p["T"], p["HV"], p["K"], p["V"]
    BH = b.op("Mul", B, HV)

    def fold(x, width):  # [B, T, HV, d] -> [B * HV, T, d]
        return b.op("Reshape", b.op("Transpose", x, perm=[0, 2, 1, 3]), b.op("Concat", BH, T, width, axis=0))

    q, k, v, g = fold(p["q"], K), fold(p["k"], K), fold(p["v"], V), fold(p["g"], K)
    beta = fold(b.unsqueeze(p["beta"], 3), b.ints(1))
    state = b.op("Reshape", b.to_float("initial_state"), b.op("Concat", BH, b.ints(1), K, V, axis=0))
    scale = onnx.AttributeProto()
    scale.name, scale.ref_attr_name, scale.type = "scale", "scale", onnx.AttributeProto.FLOAT
    out, present = b.op("LinearAttention", q, k, v, state, g, beta, outputs=2, q_num_heads=1, kv_num_heads=1,
                        update_rule="gated_delta")
    b.nodes[-1].attribute.append(scale)
    o = b.op("Transpose", b.op("Reshape", out, b.op("Concat", B, HV, T, V, axis=0)), perm=[0, 2, 1, 3])
    b.nodes.append(helper.make_node("CastLike", [o, "v"], ["o"]))
    b.nodes.append(helper.make_node("Reshape", [present, b.op("Concat", B, HV, K, V, axis=0)], ["final_state"]))
    return _function(b.nodes, opset)


def raise_default_opset(model: onnx.ModelProto, version: int) -> None:
    """Import the default domain at ``version`` (at least) in the model and in its functions.  The ops the
    exporter emits keep their meaning from opset 18 to 27 (only types were added); the parity tests check it."""
    for imports in [model.opset_import] + [f.opset_import for f in model.functions]:
        for entry in imports:
            if entry.domain in ("", "ai.onnx") and entry.version < version:
                entry.version = version
