"""Run transformers' ``KimiLinearForCausalLM`` with its KDA on kda_compile: no internet, no FLA.

transformers' KDA layer calls two module-level functions of ``transformers.models.kimi_linear.modeling_kimi_linear``,
``chunk_kimi_delta_attention`` (prefill) and ``recurrent_kimi_delta_attention`` (decode).  Each was bound at
import time to a hub kernel, FLA's ``chunk_kda`` / ``fused_recurrent_kda``, or a slow pure-PyTorch loop.  This
module rebinds both names to :func:`kda_compile.chunk_kda` / :func:`kda_compile.fused_recurrent_kda`, whose
arguments are FLA's, so the dispatch picks TileLang, Triton or the PyTorch reference for every call::

    from transformers import KimiLinearForCausalLM
    from kda_compile.integrations.transformers import use_kda_compile

    model = KimiLinearForCausalLM.from_pretrained(path)
    with use_kda_compile():                      # or: enable() ... disable()
        out = model.generate(input_ids, max_new_tokens=32)

transformers computes the gate and ``sigmoid(beta)`` itself and passes them in, so the calls use KDA's plain form
(``use_gate_in_kernel=False``), with the L2 norm of q and k inside the op as transformers asks.
"""
from __future__ import annotations

import contextlib
import importlib

from .. import api as kda_api

MODULE = "transformers.models.kimi_linear.modeling_kimi_linear"
NAMES = ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention")
_saved: dict = {}
_backend: list = [None]


def _modeling():
    try:
        return importlib.import_module(MODULE)
    except ImportError as err:
        raise ImportError("kda_compile.integrations.transformers needs transformers with Kimi Linear "
                          "(pip install 'kda_compile[transformers]', transformers >= 5.24)") from err


def _passthrough(kwargs: dict) -> dict:
    """The keywords of transformers' call that mean something to kda_compile (packed sequences)."""
    return {k: kwargs[k] for k in ("cu_seqlens",) if kwargs.get(k) is not None}


def chunk_kimi_delta_attention(query, key, value, g, beta, chunk_size=64, initial_state=None,
                               output_final_state=False, use_qk_l2norm_in_kernel=False, **kwargs):
    """transformers' prefill KDA call, run by :func:`kda_compile.chunk_kda`: ``query, key, value [B, T, H, D]``,
    ``g`` (log decay) ``[B, T, H, K]``, ``beta`` (after sigmoid) ``[B, T, H]``; returns ``(o, final_state)``."""
    return kda_api.chunk_kda(query, key, value, g, beta, initial_state=initial_state,
                             output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                             chunk_size=chunk_size if chunk_size in (32, 64) else 64, backend=_backend[0],
                             **_passthrough(kwargs))


def recurrent_kimi_delta_attention(query, key, value, g, beta, initial_state, output_final_state,
                                   use_qk_l2norm_in_kernel=False, **kwargs):
    """transformers' decode KDA call, run by :func:`kda_compile.fused_recurrent_kda` (same tensors as
    :func:`chunk_kimi_delta_attention`)."""
    return kda_api.fused_recurrent_kda(query, key, value, g, beta, initial_state=initial_state,
                                       output_final_state=output_final_state,
                                       use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, backend=_backend[0],
                                       **_passthrough(kwargs))


_OURS = {"chunk_kimi_delta_attention": chunk_kimi_delta_attention,
         "recurrent_kimi_delta_attention": recurrent_kimi_delta_attention}


def enable(backend: str | None = None) -> None:
    """Route transformers' Kimi Linear KDA calls to kda_compile (every model, from now on).  ``backend``
    forces ``"reference"``, ``"triton"`` or ``"tilelang"``; None lets the dispatch choose."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'triton' or None, got {type(backend).__name__}")
    module = _modeling()
    for name in NAMES:
        current = getattr(module, name)
        if current is not _OURS[name]:
            _saved[name] = current
        setattr(module, name, _OURS[name])
    _backend[0] = backend


def disable() -> None:
    """Give transformers back the functions it chose at import (hub kernel, FLA or its PyTorch loop)."""
    module = _modeling()
    for name in NAMES:
        if name in _saved:
            setattr(module, name, _saved.pop(name))
    _backend[0] = None


def is_enabled() -> bool:
    """Whether transformers' Kimi Linear currently runs its KDA on kda_compile."""
    module = _modeling()
    return all(getattr(module, name) is _OURS[name] for name in NAMES)


def fallback_implementation() -> str:
    """What transformers itself would run for KDA here: ``"fla"`` (FLA importable) or ``"pytorch"`` (its loop)."""
    module = _modeling()
    fn = _saved.get(NAMES[0], getattr(module, NAMES[0]))
    if fn is _OURS[NAMES[0]]:
        return "kda_compile"
    try:
        importlib.import_module("fla.ops.kda")
        return "fla"
    except Exception:
        return "pytorch"


@contextlib.contextmanager
def use_kda_compile(backend: str | None = None):
    """Context manager: :func:`enable` inside, the previous functions restored after."""
    was = is_enabled()
    previous = _backend[0]
    enable(backend)
    try:
        yield
    finally:
        if was:
            _backend[0] = previous
        else:
            disable()
