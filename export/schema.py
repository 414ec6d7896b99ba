"""The ``kda_compile::KDA`` ONNX operator: one node per KDA call (docs/onnx.md is the reference page).

Domain ``kda_compile``, version 1.  Inputs, in order (all required; shapes use FLA's names)::

    0 q              [B, T, H, K]    T   queries
    1 k              [B, T, H, K]    T   keys
    2 v              [B, T, HV, V]   T   values (HV a multiple of H: value head h uses key head h // (HV/H))
    3 g              [B, T, HV, K]   T   log decay, or the raw gate when use_gate_in_kernel=1
    4 beta           [B, T, HV]      T   delta-rule rate, or its logits when use_beta_sigmoid_in_kernel=1
    5 initial_state  [B, HV, K, V]   float32   state entering the first token (zeros for a fresh sequence)
    6 A_log          [HV]            float32   gate parameter (read only when use_gate_in_kernel=1)
    7 dt_bias        [HV * K]        float32   gate bias (read only when use_gate_in_kernel=1)

Outputs: ``o [B, T, HV, V]`` (type T) and ``final_state [B, HV, K, V]`` (float32).  T is float32, float16
or bfloat16; the op computes in float32.  The state layout is always ``[.., K, V]``: an exporter of a model
that keeps ``[.., V, K]`` (``state_v_first``) adds Transpose nodes around the op.
"""
from __future__ import annotations

import onnx
from onnx import defs

DOMAIN = "kda_compile"
VERSION = 1
OP_TYPE = "KDA"

INPUTS = ("q", "k", "v", "g", "beta", "initial_state", "A_log", "dt_bias")
OUTPUTS = ("o", "final_state")

# name -> (AttrType, default, meaning).  ``scale`` has no default (it depends on K); exporters always write it.
ATTRIBUTES = {
    "scale": (defs.OpSchema.AttrType.FLOAT, None, "output scale, usually K ** -0.5"),
    "use_qk_l2norm_in_kernel": (defs.OpSchema.AttrType.INT, 0, "1: L2-normalise q and k over K first (eps 1e-6)"),
    "use_gate_in_kernel": (defs.OpSchema.AttrType.INT, 0,
                           "1: g is the raw gate; decay = -exp(A_log) * softplus(g + dt_bias), or with "
                           "lower_bound < 0, lower_bound * sigmoid(exp(A_log) * (g + dt_bias))"),
    "lower_bound": (defs.OpSchema.AttrType.FLOAT, 0.0, "safe-gate bound (< 0); 0 means no safe gate"),
    "use_beta_sigmoid_in_kernel": (defs.OpSchema.AttrType.INT, 0, "1: beta arrives as logits, apply sigmoid"),
    "allow_neg_eigval": (defs.OpSchema.AttrType.INT, 0, "1: with sigmoid beta, use 2 * sigmoid(beta)"),
    "chunk_size": (defs.OpSchema.AttrType.INT, 64, "chunk length of the chunkwise body (1..64)"),
}

MAX_CHUNK = 64  # the Loop body's triangular inverse has log2(64) = 6 doubling levels


def op_schema() -> defs.OpSchema:
    """The ``onnx.defs.OpSchema`` of ``kda_compile::KDA`` version 1 (not registered globally)."""
    P = defs.OpSchema.FormalParameter
    single = defs.OpSchema.FormalParameterOption.Single
    inputs = [P(name, "S" if name in ("initial_state", "A_log", "dt_bias") else "T", "", param_option=single)
              for name in INPUTS]
    outputs = [P("o", "T", "", param_option=single), P("final_state", "S", "", param_option=single)]
    attributes = []
    for name, (kind, default, doc) in ATTRIBUTES.items():
        if default is None:
            attributes.append(defs.OpSchema.Attribute(name, kind, doc, required=True))
        else:
            attributes.append(defs.OpSchema.Attribute(name, _attr(name, default), doc))
    return defs.OpSchema(
        OP_TYPE, DOMAIN, VERSION, doc=__doc__, inputs=inputs, outputs=outputs,
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
                          ("S", ["tensor(float)"], "state and gate parameters")],
        attributes=attributes)


def _attr(name: str, value) -> onnx.AttributeProto:
    return onnx.helper.make_attribute(name, value)


def node_attributes(scale: float, use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, lower_bound=None,
                    use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, chunk_size=64) -> dict:
    """The attribute dict of one node (every attribute written out; ``lower_bound=None`` -> 0.0)."""
    if not 1 <= int(chunk_size) <= MAX_CHUNK:
        raise ValueError(f"chunk_size must lie in [1, {MAX_CHUNK}] for the ONNX body, got {chunk_size}")
    if lower_bound is not None and not lower_bound < 0:
        raise ValueError(f"lower_bound must be negative (or None), got {lower_bound}")
    return dict(scale=float(scale), use_qk_l2norm_in_kernel=int(bool(use_qk_l2norm_in_kernel)),
                use_gate_in_kernel=int(bool(use_gate_in_kernel)),
                lower_bound=0.0 if lower_bound is None else float(lower_bound),
                use_beta_sigmoid_in_kernel=int(bool(use_beta_sigmoid_in_kernel)),
                allow_neg_eigval=int(bool(allow_neg_eigval)), chunk_size=int(chunk_size))


def opset_import() -> onnx.OperatorSetIdProto:
    """``opset_import`` entry a model using the op must carry."""
    return onnx.helper.make_opsetid(DOMAIN, VERSION)
