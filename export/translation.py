"""How the dynamo ONNX exporter turns our torch custom ops into one ``kda_compile::KDA`` node each.

The translation functions run at export time on symbolic values: they emit the bare custom-domain node (an
onnxscript ``Op`` built from the op's ``OpSchema``) plus, where the torch call leaves an input out, the zeros it
stands for.  The node's meaning (its ONNX function body) is attached to the model afterwards
(:mod:`kda_compile.export.exporter`).
"""
from __future__ import annotations

import torch
from onnxscript import opset18 as op
from onnxscript import values

from . import schema

_FLOAT = 1  # TensorProto.FLOAT

KDA_OP = values.Op(values.Opset(schema.DOMAIN, schema.VERSION), schema.OP_TYPE, schema.op_schema())


def _kda_node(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, options, what: str):
    """Emit one KDA node for a chunk or recurrent call; returns ``(o, final_state)``."""
    scale, l2, gate, bsig, neg, lower_bound, chunk_size, state_v_first = options
    if cu_seqlens is not None:
        raise ValueError(f"ONNX export of {what}: cu_seqlens (varlen packs) is not supported; export with "
                         "padded batches [B, T, ...] instead")
    B, K = op.Shape(q, start=0, end=1), op.Shape(q, start=3, end=4)
    HV, V = op.Shape(v, start=2, end=3), op.Shape(v, start=3, end=4)
    if initial_state is None:
        state = op.ConstantOfShape(op.Concat(B, HV, K, V, axis=0))     # float32 zeros: a fresh sequence
    elif state_v_first:
        state = op.Transpose(op.Cast(initial_state, to=_FLOAT), perm=[0, 1, 3, 2])
    else:
        state = op.Cast(initial_state, to=_FLOAT)
    A_log = op.ConstantOfShape(HV) if A_log is None else op.Cast(A_log, to=_FLOAT)
    dt_bias = op.ConstantOfShape(op.Mul(HV, K)) if dt_bias is None else op.Cast(dt_bias, to=_FLOAT)
    attrs = schema.node_attributes(scale, l2, gate, lower_bound if gate else None, bsig, neg,
                                   min(int(chunk_size), schema.MAX_CHUNK))
    o, final = KDA_OP(q, k, v, g, beta, state, A_log, dt_bias, **attrs)
    if state_v_first:
        final = op.Transpose(final, perm=[0, 1, 3, 2])
    return o, final


def chunk_kda_fwd(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, scale, use_qk_l2norm_in_kernel,
                  use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval, lower_bound, chunk_size,
                  state_v_first, output_final_state=True, backend=""):
    """Translation of ``kda_compile::chunk_kda_fwd`` (prefill).  The final state is always computed (an
    unused graph output costs nothing once the exporter prunes it)."""
    options = (scale, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval,
               lower_bound, chunk_size, state_v_first)
    return _kda_node(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, options, "chunk_kda")


def recurrent_kda_fwd(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, ssm_state_indices,
                      num_accepted_tokens, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel,
                      use_beta_sigmoid_in_kernel, allow_neg_eigval, lower_bound, chunk_size, state_v_first,
                      output_final_state=True, backend=""):
    """Translation of ``kda_compile::recurrent_kda_fwd`` (decode): the same node; with T = 1 its body runs a
    single one-token chunk."""
    if ssm_state_indices is not None or num_accepted_tokens is not None:
        raise ValueError("ONNX export of fused_recurrent_kda: ssm_state_indices / num_accepted_tokens (state "
                         "pools, speculative decoding) are not supported; pass the state of each sequence")
    options = (scale, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval,
               lower_bound, chunk_size, state_v_first)
    return _kda_node(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, options, "fused_recurrent_kda")


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``."""
    from kda_compile import ops  # noqa: F401  (registers the torch ops)
    return {torch.ops.kda_compile.chunk_kda_fwd.default: chunk_kda_fwd,
            torch.ops.kda_compile.recurrent_kda_fwd.default: recurrent_kda_fwd}
