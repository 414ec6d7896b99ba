"""A few lines that make hand-written ONNX node lists read like the math (used by the function bodies)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Nodes:
    """Collects ``NodeProto``s; every call returns the name(s) of the new node's output(s).

    ``prefix`` keeps value names unique between a graph and its subgraphs (a Loop body sees its outer scope).
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attrs):
        names = [self._name(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self._name("n_" + op_type),
                                           domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=np.float32) -> str:
        """A Constant node holding ``value`` (a scalar gives a 0-d tensor)."""
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), self._name("c"))
        return self.op("Constant", value=tensor)

    def ints(self, *values) -> str:
        """1-D int64 constant (shapes, axes)."""
        return self.const(list(values), np.int64)

    def attr_const(self, attr_name: str, kind: int) -> str:
        """Constant whose value is the enclosing function's attribute ``attr_name`` (``ref_attr_name``)."""
        name = self._name("attr_" + attr_name)
        field = {onnx.AttributeProto.FLOAT: "value_float", onnx.AttributeProto.INT: "value_int"}[kind]
        attr = onnx.AttributeProto()
        attr.name, attr.ref_attr_name, attr.type = field, attr_name, kind
        node = helper.make_node("Constant", [], [name], name=self._name("n_Constant"))
        node.attribute.append(attr)
        self.nodes.append(node)
        return name

    # small vocabulary used by the bodies
    def dim(self, shape: str, index: int) -> str:
        """Element ``index`` of a shape vector, as a 1-element int64 tensor."""
        return self.op("Slice", shape, self.ints(index), self.ints(index + 1))

    def unsqueeze(self, x: str, *axes: int) -> str:
        return self.op("Unsqueeze", x, self.ints(*axes))

    def to_float(self, x: str) -> str:
        return self.op("Cast", x, to=TensorProto.FLOAT)


def value_info(name: str, elem_type=TensorProto.FLOAT, shape=None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)
