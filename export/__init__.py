"""ONNX export of KDA models with KDA as a custom-domain op (installed as ``kda_compile.export``)."""
