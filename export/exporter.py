"""Export a module (the hybrid model, or any module calling ``kda_compile.chunk_kda`` / ``fused_recurrent_kda``)
to ONNX with every KDA call as one ``kda_compile::KDA`` node, and attach that op's function body.

    from kda_compile.export import export_hybrid
    paths = export_hybrid(model, "out/")        # out/prefill.onnx, out/decode.onnx

Graphs (names from ``HybridCache.tensor_names``):

* ``prefill.onnx``: ``input_ids [batch, seq]`` + ``past_*`` cache -> ``logits [batch, seq, vocab]`` +
  ``present_*`` cache.  The MLA latents have a dynamic ``past`` axis; an empty cache (zero states, 0-length
  latents) means a fresh prompt.
* ``decode.onnx``: the same with ``input_ids [batch, 1]`` (one token per sequence).

``body="linear_attention"`` gives the op the opset-27 ``LinearAttention`` body, which raises the model's default
opset to 27 (onnxruntime >= 1.32 runs it; 1.30 and 1.31 refuse opset 27); ``body="loop"`` the chunkwise Loop body
(opset >= 18).  ``body=None`` (the default) picks ``linear_attention`` when the installed onnxruntime is 1.32 or
newer, else ``loop`` (:func:`default_body`).

Mixture-of-experts layers export as plain ONNX ops: the router (MatMul, Sigmoid, TopK, ScatterElements) and the
routed experts in the form ``moe_impl`` names: ``"dense"`` (default: every expert on every token, weighted by the
scattered routing weights; onnxruntime ran it 3x faster than ``gather`` at the 8-expert tiny config) or
``"gather"`` (Gather of the chosen experts' weights, then Einsum: top_k / E of the work, the form for many experts
such as the published model's 256).
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import onnx
import torch
from torch import nn

from . import schema
from .function_body import loop_function
from .linear_attention_body import LINEAR_ATTENTION_OPSET, linear_attention_function, raise_default_opset
from .translation import translation_table

BODIES = ("loop", "linear_attention")
MOE_IMPLS = ("gather", "dense")


def default_body() -> str:
    """``"linear_attention"`` when the installed onnxruntime runs opset 27 (>= 1.32), else ``"loop"``."""
    try:
        import onnxruntime
        major, minor = (int(x) for x in onnxruntime.__version__.split(".")[:2])
    except (ImportError, ValueError):
        return "loop"
    return "linear_attention" if (major, minor) >= (1, 32) else "loop"


def _resolve_body(body) -> str:
    body = default_body() if body is None else body
    if body not in BODIES:
        raise ValueError(f"body must be one of {BODIES} or None (pick by onnxruntime version), got {body!r}")
    return body


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default (``ai.onnx``) domain a model imports."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def attach_kda_function(model: onnx.ModelProto, body: str | None = None) -> onnx.ModelProto:
    """Give ``model`` (in place) the model-local function of ``kda_compile::KDA`` with the chosen body (None:
    :func:`default_body`), import our domain, and run ``onnx.checker`` (full check).  Returns the model."""
    body = _resolve_body(body)
    uses_op = any(n.domain == schema.DOMAIN and n.op_type == schema.OP_TYPE for n in model.graph.node)
    kept = [f for f in model.functions if not (f.domain == schema.DOMAIN and f.name == schema.OP_TYPE)]
    del model.functions[:]
    model.functions.extend(kept)
    if uses_op:
        # The exporter's shapes for KDA outputs come from the torch op's fake kernel, which gives an unused final
        # state (output_final_state=False) as an empty 1-D tensor; the function body's shape inference knows
        # better, so drop them rather than let the checker see two ranks for one value.
        kda_outputs = {o for n in model.graph.node if n.domain == schema.DOMAIN for o in n.output}
        kept_info = [v for v in model.graph.value_info if v.name not in kda_outputs]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept_info)
        if body == "linear_attention":
            raise_default_opset(model, LINEAR_ATTENTION_OPSET)
            model.functions.append(linear_attention_function(default_opset(model)))
        else:
            model.functions.append(loop_function(default_opset(model)))
        if not any(o.domain == schema.DOMAIN for o in model.opset_import):
            model.opset_import.append(schema.opset_import())
    onnx.checker.check_model(model, full_check=True)
    return model


def export_module(module: nn.Module, args: tuple, path: str | None = None, *, input_names=None, output_names=None,
                  dynamic_shapes=None, body: str | None = None) -> onnx.ModelProto:
    """``torch.onnx.export`` (dynamo) with our translation table, then :func:`attach_kda_function`; writes
    ``path`` (one file, weights inside) when given and returns the model."""
    body = _resolve_body(body)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's FutureWarnings / axis-renaming notes
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision
        program = torch.onnx.export(module, args, dynamo=True, custom_translation_table=translation_table(),
                                    input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, verbose=False, report=False)
    model = attach_kda_function(program.model_proto, body)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        onnx.save(model, path)
    return model


# --------------------------------------------------------------------------------------- hybrid model

class HybridStep(nn.Module):
    """``(input_ids, *past) -> (logits, *present)``: the hybrid model's functional cached forward with the
    cache as flat tensors (the order of ``HybridCache.flatten``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, past: list):
        from kda_compile.model import HybridCache
        logits, cache = self.model.forward_cached(input_ids, HybridCache.unflatten(self.model.config, past))
        return (logits, *cache.flatten())


@dataclass
class ExportedHybrid:
    """Paths and interface of an exported hybrid model."""

    prefill: str
    decode: str
    input_names: list
    output_names: list
    body: str


def _example_cache(config, batch: int, past: int, dtype):
    """A cache with ``past`` tokens (random, so nothing is constant-folded) of the right shapes."""
    from kda_compile.model import HybridCache
    gen = torch.Generator().manual_seed(0)
    empty = HybridCache.empty(config, batch, dtype=dtype)
    tensors = []
    for t in empty.flatten():
        shape = list(t.shape)
        if t.dim() == 3 and shape[1] == 0:   # MLA latent [B, L, rank]
            shape[1] = past
        tensors.append(torch.randn(*shape, generator=gen, dtype=t.dtype) * 0.1)
    return tensors


def _cache_dynamic_shapes(config, batch_dim, past_dim):
    from kda_compile.model import KDA
    specs = []
    for kind in config.layer_types:
        specs += [{0: batch_dim}, {0: batch_dim}] if kind == KDA else [{0: batch_dim, 1: past_dim}]
    return specs


def export_hybrid(model: nn.Module, out_dir: str, *, body: str | None = None,
                  moe_impl: str = "dense") -> ExportedHybrid:
    """Write ``out_dir/prefill.onnx`` and ``out_dir/decode.onnx`` for a ``kda_compile.model.HybridModel``
    (dynamic batch, sequence and cache-length axes).  ``body``: the KDA function body (None: by onnxruntime
    version); ``moe_impl``: the routed experts' ONNX form.  Returns their paths and tensor names."""
    from kda_compile.model import HybridCache
    from kda_compile.moe import MoE
    body = _resolve_body(body)
    if moe_impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {moe_impl!r}")
    config = model.config
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the model's dtype is {dtype}; kda_compile::KDA takes float32, float16 or bfloat16 "
                         "activations: export model.float() instead")
    step = HybridStep(model)
    batch, past = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("past", min=0, max=1 << 20)
    seq = torch.export.Dim("seq", min=2, max=1 << 20)
    cache_names = HybridCache.tensor_names(config)
    input_names = ["input_ids"] + ["past_" + n for n in cache_names]
    output_names = ["logits"] + ["present_" + n for n in cache_names]
    os.makedirs(out_dir, exist_ok=True)
    paths, was_training = {}, model.training
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    impls = [m.impl for m in moes]
    model.eval()
    for m in moes:
        m.impl = moe_impl
    try:
        for kind, T in (("prefill", 5), ("decode", 1)):
            ids = torch.randint(0, config.vocab_size, (2, T))
            cache = _example_cache(config, 2, 3, dtype)
            ids_spec = {0: batch, 1: seq} if T > 1 else {0: batch}
            shapes = (ids_spec, _cache_dynamic_shapes(config, batch, past))
            paths[kind] = os.path.join(out_dir, f"{kind}.onnx")
            export_module(step, (ids, cache), paths[kind], input_names=input_names, output_names=output_names,
                          dynamic_shapes=shapes, body=body)
    finally:
        model.train(was_training)
        for m, impl in zip(moes, impls):
            m.impl = impl
    return ExportedHybrid(paths["prefill"], paths["decode"], input_names, output_names, body)
