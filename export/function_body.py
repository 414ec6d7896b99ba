"""Body of ``kda_compile::KDA`` as a model-local ONNX function: the chunkwise algorithm of docs/algorithm.md.

Standard ONNX ops only, so any runtime can run the op; a runtime with a native kernel for our domain overrides
the function.  Layout of the computation:

1. prologue (q/k L2 norm, gate, beta sigmoid; each selected by its attribute with ``Where``), key heads
   repeated up to the value heads, everything to ``[B, HV, NT, C, d]`` with C = min(T, chunk_size) (so a
   one-token decode step runs a 1x1 chunk, not a padded 64-token one); padding tokens have k = g = beta = 0 and
   leave the state untouched;
2. one ``Loop`` over the NT chunks, carrying the state ``S [B, HV, K, V]``; per chunk only MatMuls and
   element-wise ops:  ``A_qk``/``A_kk`` from the pairwise decays ``D_rs = exp(Gamma_r - Gamma_s)`` (s <= r,
   so every exponent is <= 0), the unit lower-triangular inverse ``(I + A_kk)^-1`` by recursive block doubling
   (below), then ``W, U, V_new, O, S_next`` exactly as in docs/algorithm.md.

Triangular inverse without a solver op: with ``D_b`` the block-diagonal part of ``L = I + A_kk`` for blocks of
size b and ``E_b`` the part that ``D_2b`` adds (the lower-left b x b block inside each 2b block),
``D_2b^-1 = (I + D_b^-1 E_b)^-1 D_b^-1 = D_b^-1 - D_b^-1 E_b D_b^-1`` because ``(D_b^-1 E_b)^2 = 0``.  Starting
from ``D_1^-1 = I``, six doublings give ``L^-1`` for any C <= 64 (levels with b >= C add nothing).  This is
the classic recursive blocked triangular inversion (e.g. Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., section 14.2), written with full C x C masks so C may be dynamic.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import schema
from .builder import Nodes, value_info

L2NORM_EPS = 1e-6
_LEVELS = (1, 2, 4, 8, 16, 32)  # block sizes b of the doubling steps; 2 * 32 = schema.MAX_CHUNK


def prologue(b: Nodes, names: dict) -> dict:
    """Apply the attribute-selected prologues; returns float32 ``q, k`` (repeated to HV heads), ``v, g, beta``
    in the user's ``[B, T, heads, d]`` layout plus the shape pieces used later."""
    A = onnx.AttributeProto
    qf, kf, vf, gf, bf = (b.to_float(names[n]) for n in ("q", "k", "v", "g", "beta"))

    def flag(attr):
        return b.op("Cast", b.attr_const(attr, A.INT), to=TensorProto.BOOL)

    def l2norm(x):  # x * rsqrt(sum(x^2) + eps), as reference.l2_normalize
        ss = b.op("ReduceSum", b.op("Mul", x, x), b.ints(-1), keepdims=1)
        return b.op("Mul", x, b.op("Reciprocal", b.op("Sqrt", b.op("Add", ss, b.const(L2NORM_EPS)))))

    use_l2 = flag("use_qk_l2norm_in_kernel")
    qf = b.op("Where", use_l2, l2norm(qf), qf)
    kf = b.op("Where", use_l2, l2norm(kf), kf)

    sq, sv = b.op("Shape", qf), b.op("Shape", vf)
    B, T, H, K = (b.dim(sq, i) for i in range(4))
    HV, V = b.dim(sv, 2), b.dim(sv, 3)

    # gate: -exp(A_log) * softplus(g + dt_bias), or lower_bound * sigmoid(exp(A_log) * (g + dt_bias))
    x = b.op("Add", gf, b.op("Reshape", b.to_float(names["dt_bias"]), b.op("Concat", HV, K, axis=0)))
    a = b.op("Exp", b.op("Reshape", b.to_float(names["A_log"]), b.op("Concat", HV, b.ints(1), axis=0)))
    soft = b.op("Neg", b.op("Mul", a, b.op("Softplus", x)))
    lower = b.attr_const("lower_bound", A.FLOAT)
    safe = b.op("Mul", lower, b.op("Sigmoid", b.op("Mul", a, x)))
    gate = b.op("Where", b.op("Less", lower, b.const(0.0)), safe, soft)
    gf = b.op("Where", flag("use_gate_in_kernel"), gate, gf)

    # beta: sigmoid(beta) (times 2 with allow_neg_eigval) when given as logits
    factor = b.op("Add", b.const(1.0), b.op("Cast", b.attr_const("allow_neg_eigval", A.INT), to=TensorProto.FLOAT))
    bf = b.op("Where", flag("use_beta_sigmoid_in_kernel"), b.op("Mul", b.op("Sigmoid", bf), factor), bf)

    # grouped value heads: value head h reads key head h // (HV / H)
    group = b.op("Div", HV, H)

    def repeat_heads(x):
        wide = b.op("Expand", b.unsqueeze(x, 3), b.op("Concat", B, T, H, group, K, axis=0))
        return b.op("Reshape", wide, b.op("Concat", B, T, HV, K, axis=0))

    return dict(q=repeat_heads(qf), k=repeat_heads(kf), v=vf, g=gf, beta=bf, B=B, T=T, HV=HV, K=K, V=V)


def loop_function(opset: int) -> onnx.FunctionProto:
    """``kda_compile::KDA`` as a FunctionProto whose body is the chunkwise Loop (``opset``: the model's
    default-domain opset, >= 18)."""
    b = Nodes("kda_")
    names = {n: n for n in schema.INPUTS}
    p = prologue(b, names)
    B, T, HV, V = p["B"], p["T"], p["HV"], p["V"]
    scale = b.attr_const("scale", onnx.AttributeProto.FLOAT)

    # chunking: C = min(T, chunk_size), NT = ceil(T / C), pad the token axis to NT * C
    C = b.op("Min", T, b.op("Reshape", b.attr_const("chunk_size", onnx.AttributeProto.INT), b.ints(1)))
    NT = b.op("Div", b.op("Sub", b.op("Add", T, C), b.ints(1)), C)
    pad = b.op("Sub", b.op("Mul", NT, C), T)
    pads = b.op("Concat", b.ints(0, 0, 0, 0, 0, 0), pad, b.ints(0), axis=0)
    chunk_shape = b.op("Concat", B, HV, NT, C, b.ints(-1), axis=0)

    def chunked(x, perm=(0, 2, 1, 3)):  # [B, T, HV, d] -> [B, HV, NT, C, d]
        return b.op("Reshape", b.op("Pad", b.op("Transpose", x, perm=list(perm)), pads), chunk_shape)

    qP, kP, vP, gP = (chunked(p[n]) for n in ("q", "k", "v", "g"))
    bP = chunked(b.unsqueeze(p["beta"], 3))  # [B, HV, NT, C, 1]

    # masks over (r, s) inside a chunk
    C0 = b.op("Squeeze", C)
    idx = b.op("Range", b.const(0, np.int64), C0, b.const(1, np.int64))
    r, s = b.unsqueeze(idx, 1), b.unsqueeze(idx, 0)
    causal = b.unsqueeze(b.op("GreaterOrEqual", r, s), 2)  # [C, C, 1] for the per-channel decays
    strict = b.op("Cast", b.op("Greater", r, s), to=TensorProto.FLOAT)
    eye = b.op("Cast", b.op("Equal", r, s), to=TensorProto.FLOAT)

    def same_block(size):
        return b.op("Equal", b.op("Div", r, b.const(size, np.int64)), b.op("Div", s, b.const(size, np.int64)))

    level_masks = [b.op("Cast", b.op("And", same_block(2 * size), b.op("Not", same_block(size))),
                        to=TensorProto.FLOAT) for size in _LEVELS]

    body = _chunk_body(causal, strict, eye, level_masks, scale, qP, kP, vP, gP, bP, C0)
    S0 = b.to_float("initial_state")
    S_final, O_stack = b.op("Loop", b.op("Squeeze", NT), "", S0, outputs=2, body=body)

    # [NT, B, HV, C, V] -> [B, NT * C, HV, V] -> first T tokens
    o = b.op("Reshape", b.op("Transpose", O_stack, perm=[1, 0, 3, 2, 4]),
             b.op("Concat", B, b.ints(-1), HV, V, axis=0))
    o = b.op("Slice", o, b.ints(0), T, b.ints(1))
    b.nodes.append(helper.make_node("CastLike", [o, names["v"]], ["o"]))
    b.nodes.append(helper.make_node("Identity", [S_final], ["final_state"]))
    return _function(b.nodes, opset)


def _chunk_body(causal, strict, eye, level_masks, scale, qP, kP, vP, gP, bP, C0) -> onnx.GraphProto:
    """The Loop body: one chunk for all batches and heads.  Carries S [B, HV, K, V]; scans out O [B, HV, C, V]."""
    b = Nodes("kda_chunk_")
    i, cond_in, S = "kda_i", "kda_cond_in", "kda_S"

    def take(x, axis=2):
        return b.op("Gather", x, i, axis=axis)

    q, k, v, g, beta = take(qP), take(kP), take(vP), take(gP), take(bP)   # [B, HV, C, d], beta [B, HV, C, 1]
    G = b.op("CumSum", g, b.const(2, np.int64))                            # Gamma_r
    diff = b.op("Sub", b.unsqueeze(G, 3), b.unsqueeze(G, 2))               # Gamma_r - Gamma_s  [B, HV, C, C, K]
    D = b.op("Exp", b.op("Where", causal, diff, b.const(-np.inf)))         # only s <= r: exponents <= 0
    KD = b.op("Mul", D, b.unsqueeze(k, 2))                                  # D_rs[c] k_s[c]
    # one batched MatMul gives both sums over c: [.., r, s, K] @ [.., r, K, 2] (q_r and k_r as columns)
    qk = b.op("Concat", b.unsqueeze(q, 4), b.unsqueeze(k, 4), axis=4)
    A2 = b.op("MatMul", KD, qk)                                             # [B, HV, C, C, 2]
    A_qk = b.op("Mul", b.op("Gather", A2, b.const(0, np.int64), axis=4), scale)
    A_kk = b.op("Mul", b.op("Mul", b.op("Gather", A2, b.const(1, np.int64), axis=4), beta), strict)

    Linv = eye                                                              # (I + A_kk)^-1 by block doubling
    for mask in level_masks:
        E = b.op("Mul", A_kk, mask)
        Linv = b.op("Sub", Linv, b.op("MatMul", b.op("MatMul", Linv, E), Linv))
    Tm = b.op("Mul", Linv, b.op("Transpose", beta, perm=[0, 1, 3, 2]))      # (I + A_kk)^-1 diag(beta)

    eG = b.op("Exp", G)
    W = b.op("MatMul", Tm, b.op("Mul", k, eG))
    U = b.op("MatMul", Tm, v)
    V_new = b.op("Sub", U, b.op("MatMul", W, S))
    O = b.op("Add", b.op("Mul", b.op("MatMul", b.op("Mul", q, eG), S), scale), b.op("MatMul", A_qk, V_new))

    G_last = b.op("Gather", G, b.op("Sub", C0, b.const(1, np.int64)), axis=2)  # Gamma_C  [B, HV, K]
    decay_to_end = b.op("Exp", b.op("Sub", b.unsqueeze(G_last, 2), G))        # exp(Gamma_C - Gamma_r) <= 1
    k_end = b.op("Transpose", b.op("Mul", k, decay_to_end), perm=[0, 1, 3, 2])
    S_next = b.op("Add", b.op("Mul", b.op("Exp", b.unsqueeze(G_last, 3)), S), b.op("MatMul", k_end, V_new))
    cond_out = b.op("Identity", cond_in)

    return helper.make_graph(
        b.nodes, "kda_chunk",
        [value_info(i, TensorProto.INT64, []), value_info(cond_in, TensorProto.BOOL, []),
         value_info(S, shape=[None] * 4)],
        [value_info(cond_out, TensorProto.BOOL, []), value_info(S_next, shape=[None] * 4),
         value_info(O, shape=[None] * 4)])


def _function(nodes, opset: int) -> onnx.FunctionProto:
    """Wrap a body as the model-local function ``kda_compile::KDA`` with the schema's attributes."""
    required = [name for name, (_, default, _) in schema.ATTRIBUTES.items() if default is None]
    defaults = [helper.make_attribute(name, default) for name, (_, default, _) in schema.ATTRIBUTES.items()
                if default is not None]
    return helper.make_function(
        schema.DOMAIN, schema.OP_TYPE, list(schema.INPUTS), list(schema.OUTPUTS), nodes,
        [helper.make_opsetid("", opset)], attributes=required, attribute_protos=defaults,
        doc_string="KDA (Kimi Delta Attention), chunkwise form; see docs/onnx.md")
