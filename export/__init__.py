"""ONNX export of KDA models with KDA as a custom-domain op (installed as ``kda_compile.export``).

Every KDA call becomes one ``kda_compile::KDA`` node (version 1, schema in :mod:`.schema`, docs/onnx.md); the
model carries a local ONNX function for that op (the chunkwise algorithm as a ``Loop`` over chunks, or
opset 27's ``LinearAttention``), so onnxruntime runs the graphs unmodified.

    from kda_compile.export import export_hybrid, OnnxHybridRunner
    export_hybrid(model, "out/")                  # out/prefill.onnx, out/decode.onnx
    runner = OnnxHybridRunner("out/")
    logits, cache = runner.prefill(input_ids)

Command line: ``python -m kda_compile.export --out DIR`` (``--help`` for options).
"""
from .exporter import BODIES, MOE_IMPLS, ExportedHybrid, attach_kda_function, default_body, export_hybrid, export_module
from .op_model import kda_node_model
from .runner import OnnxHybridRunner
from .schema import DOMAIN, OP_TYPE, VERSION, node_attributes, op_schema

__all__ = ["export_hybrid", "export_module", "attach_kda_function", "default_body", "ExportedHybrid", "BODIES",
           "MOE_IMPLS", "OnnxHybridRunner",
           "kda_node_model", "op_schema", "node_attributes", "DOMAIN", "OP_TYPE", "VERSION"]
