"""A model holding exactly one ``kda_compile::KDA`` node: the op on its own, for tests, benchmarks of the two
bodies, and as the smallest example of the op's interface (docs/onnx.md)."""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from . import schema
from .exporter import attach_kda_function

_RANKS = {"q": 4, "k": 4, "v": 4, "g": 4, "beta": 3, "initial_state": 4, "A_log": 1, "dt_bias": 1}
_DIMS = {"q": ["B", "T", "H", "K"], "k": ["B", "T", "H", "K"], "v": ["B", "T", "HV", "V"],
         "g": ["B", "T", "HV", "K"], "beta": ["B", "T", "HV"], "initial_state": ["B", "HV", "K", "V"],
         "A_log": ["HV"], "dt_bias": ["HVxK"], "o": ["B", "T", "HV", "V"], "final_state": ["B", "HV", "K", "V"]}


def kda_node_model(scale: float, *, body: str = "loop", opset: int = 20, elem_type: int = TensorProto.FLOAT,
                   **flags) -> onnx.ModelProto:
    """A checked model ``(q, k, v, g, beta, initial_state, A_log, dt_bias) -> (o, final_state)`` with one KDA
    node (attributes from ``scale`` and ``flags``, see :func:`kda_compile.export.schema.node_attributes`).
    ``elem_type`` is the activation type T (float32 by default); state and gate parameters are float32."""
    def info(name):
        kind = TensorProto.FLOAT if name in ("initial_state", "A_log", "dt_bias", "final_state") else elem_type
        return helper.make_tensor_value_info(name, kind, _DIMS[name])

    node = helper.make_node(schema.OP_TYPE, list(schema.INPUTS), list(schema.OUTPUTS), domain=schema.DOMAIN,
                            name="kda", **schema.node_attributes(scale, **flags))
    graph = helper.make_graph([node], "kda_op", [info(n) for n in schema.INPUTS], [info(n) for n in schema.OUTPUTS])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), schema.opset_import()])
    return attach_kda_function(model, body)
