"""Public API: ``chunk_kda`` and ``fused_recurrent_kda``, with the signatures of flash-linear-attention's
``fla.ops.kda`` (0.6.0).

Both check their inputs (:mod:`kda_compile.checks`), then call the ``kda_compile::`` custom ops
(:mod:`kda_compile.ops`), inside which the dispatch picks a backend; plain eager inference runs the op's kernel
body directly (:func:`kda_compile.ops.call`).  ``explain`` answers, for the same
arguments, which backend a call would use and why, without running it.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from . import dispatch, ops  # noqa: F401  (ops registers the custom ops)
from .checks import check_chunk_pool, check_inputs, check_serving, legacy_state_layout, reject_unknown_keywords
from .reference import KDAOptions


def _options(q, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval,
             lower_bound, chunk_size, state_v_first) -> KDAOptions:
    return _build_options(q.shape[-1], scale, bool(use_qk_l2norm_in_kernel), bool(use_gate_in_kernel),
                          bool(use_beta_sigmoid_in_kernel), bool(allow_neg_eigval), lower_bound, chunk_size,
                          bool(state_v_first))


@functools.lru_cache(maxsize=256)
def _build_options(K, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval,
                   lower_bound, chunk_size, state_v_first) -> KDAOptions:
    """The options of a call (immutable, so one object serves every call with the same arguments: building the
    frozen dataclass costs more than the cache lookup)."""
    return KDAOptions(
        scale=float(K ** -0.5 if scale is None else scale),
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_gate_in_kernel=use_gate_in_kernel,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
        # lower_bound only shapes the gate computed in the kernel; a precomputed g is used as given.
        lower_bound=None if lower_bound is None or not use_gate_in_kernel else float(lower_bound),
        chunk_size=int(chunk_size), state_v_first=state_v_first)


def _check(q, k, v, g, beta, *, initial_state=None, cu_seqlens=None, cu_seqlens_cpu=None, A_log=None,
           dt_bias=None, scale=None, use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
           use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, safe_gate=False, lower_bound=None,
           chunk_size=64, state_v_first=False, state_is_pool=False):
    """Check the arguments and derive the options: ``(Problem, KDAOptions)`` (shared by the API and explain)."""
    problem = check_inputs(q, k, v, g, beta, initial_state=initial_state, cu_seqlens=cu_seqlens,
                           cu_seqlens_cpu=cu_seqlens_cpu, A_log=A_log, dt_bias=dt_bias, scale=scale,
                           use_gate_in_kernel=use_gate_in_kernel, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
                           allow_neg_eigval=allow_neg_eigval, safe_gate=safe_gate, lower_bound=lower_bound,
                           chunk_size=chunk_size, state_v_first=state_v_first, state_is_pool=state_is_pool)
    opts = _options(q, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
                    allow_neg_eigval, lower_bound, chunk_size, state_v_first)
    return problem, opts


def _check_backend(backend) -> str:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'reference', 'triton' or 'tilelang', or None; "
                        f"got {type(backend).__name__}")
    return backend or ""


def _requires_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
              allow_neg_eigval=False, safe_gate=False, lower_bound=None, disable_recompute=False,
              return_intermediate_states=False, state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, *,
              chunk_size=64, A_log=None, dt_bias=None, ssm_state_indices=None, inplace_final_state=False,
              backend=None, **kwargs):
    """Chunkwise KDA, the prefill/training path; same arguments and meaning as ``fla.ops.kda.chunk_kda``.

    Shapes: ``q, k [B, T, H, K]``, ``v [B, T, HV, V]`` (HV a multiple of H), ``g [B, T, HV, K]`` (log decay,
    or the raw gate with ``use_gate_in_kernel``), ``beta [B, T, HV]``, ``initial_state [N, HV, K, V]``
    float32 (``[N, HV, V, K]`` with ``state_v_first``).  With ``cu_seqlens`` (``[N + 1]``) B must be 1.

    Returns ``(o [B, T, HV, V], final_state or None)``, or ``(o, final_state, h)`` with
    ``return_intermediate_states`` (inference only; ``h`` is the state entering each chunk).

    Serving extras (inference only), for mixed prefill + decode packs: ``initial_state`` may be a pool
    ``[P, HV, K, V]`` with ``ssm_state_indices [N]`` the slot of each sequence (negative: padding, the
    sequence is skipped and its output is zeros); with ``inplace_final_state`` the final states are written
    back to those slots and the returned state is None.  Each sequence's result equals a call on it alone.
    ``backend`` forces ``"tilelang"``, ``"triton"`` or ``"reference"``; ``disable_recompute`` is accepted
    for compatibility.  ``cp_context`` (:func:`kda_compile.context_parallel.build_cp_context`) splits one
    sequence or pack over the ranks of a process group (:func:`kda_compile.context_parallel.chunk_kda_cp`); FLA's
    graph keywords (``use_graph``, ``max_num_seqs``) are accepted at FLA's defaults only; FLA's deprecated
    ``transpose_state_layout`` means ``state_v_first`` (with a DeprecationWarning).
    """
    state_v_first = legacy_state_layout(kwargs, state_v_first)
    if kwargs.get("cp_context") is not None:  # one sequence (or pack) split over ranks: context_parallel.py
        if return_intermediate_states:
            raise ValueError("return_intermediate_states is not supported with cp_context")
        from .context_parallel import chunk_kda_cp
        cp_context = kwargs.pop("cp_context")
        reject_unknown_keywords(kwargs, "chunk_kda")
        return chunk_kda_cp(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                            use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval, safe_gate, lower_bound,
                            disable_recompute, state_v_first, cu_seqlens, cu_seqlens_cpu, cp_context=cp_context,
                            chunk_size=chunk_size, A_log=A_log, dt_bias=dt_bias, backend=backend)
    reject_unknown_keywords(kwargs, "chunk_kda")
    pooled = ssm_state_indices is not None
    problem, opts = _check(q, k, v, g, beta, initial_state=initial_state, cu_seqlens=cu_seqlens,
                           cu_seqlens_cpu=cu_seqlens_cpu, A_log=A_log, dt_bias=dt_bias, scale=scale,
                           use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_gate_in_kernel=use_gate_in_kernel,
                           use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
                           safe_gate=safe_gate, lower_bound=lower_bound, chunk_size=chunk_size,
                           state_v_first=state_v_first, state_is_pool=pooled)
    backend = _check_backend(backend)
    tensors = (q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias)
    if pooled or inplace_final_state:
        check_chunk_pool(problem, initial_state, ssm_state_indices, inplace_final_state, return_intermediate_states,
                         cu_seqlens)
        if _requires_grad(q, k, v, g, beta, initial_state, A_log, dt_bias):
            raise ValueError("ssm_state_indices / inplace_final_state are for inference only: run under "
                             "torch.inference_mode() or torch.no_grad()")
        o, final = ops.call("chunk_kda_pooled", problem, opts, tensors + (ssm_state_indices,),
                            bool(output_final_state), bool(inplace_final_state), backend,
                            written=initial_state if inplace_final_state else None)
        return o, (final if output_final_state and not inplace_final_state else None)
    if return_intermediate_states:
        if _requires_grad(q, k, v, g, beta, initial_state, A_log, dt_bias):
            raise ValueError("return_intermediate_states=True is for inference only: run under "
                             "torch.inference_mode() or torch.no_grad()")
        o, final, h = torch.ops.kda_compile.chunk_kda_fwd_states(*tensors, *opts.as_op_args(), backend)
        return o, (final if output_final_state else None), h
    o, final = ops.call("chunk_kda_fwd", problem, opts, tensors, bool(output_final_state), backend,
                        needs_grad=_requires_grad(q, k, v, g, beta, initial_state, A_log, dt_bias))
    return o, (final if output_final_state else None)


def fused_recurrent_kda(q, k, v, g, beta, A_log=None, dt_bias=None, scale=None, initial_state=None,
                        output_final_state=False, use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
                        use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, lower_bound=None,
                        state_v_first=False, cu_seqlens=None, *, ssm_state_indices=None, num_accepted_tokens=None,
                        inplace_final_state=False, backend=None, **kwargs):
    """Token-by-token KDA, the decode/serving path; same arguments as ``fla.ops.kda.fused_recurrent_kda``.

    Serving extras: ``initial_state`` may be a pool ``[P, HV, K, V]`` indexed by ``ssm_state_indices``
    (``[N]``: slot of sequence n; ``[N, S]``: one slot per draft token, the initial state read from column
    ``num_accepted_tokens[n] - 1``).  With ``inplace_final_state`` the new state is written into
    ``initial_state`` (1-D indices: the final state to ``idx[n]``; 2-D: the state after token t to
    ``idx[n, t]``) and the returned state is None.  Returns ``(o, final_state or None)``.
    Index values are checked on CPU tensors, and on a GPU only with ``KDA_COMPILE_DEBUG=1`` (a device sync).
    """
    state_v_first = legacy_state_layout(kwargs, state_v_first)
    reject_unknown_keywords(kwargs, "fused_recurrent_kda")
    pooled = ssm_state_indices is not None
    problem, opts = _check(q, k, v, g, beta, initial_state=initial_state, cu_seqlens=cu_seqlens, A_log=A_log,
                           dt_bias=dt_bias, scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                           use_gate_in_kernel=use_gate_in_kernel,
                           use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
                           lower_bound=lower_bound, state_v_first=state_v_first, state_is_pool=pooled)
    check_serving(problem, initial_state, ssm_state_indices, num_accepted_tokens, inplace_final_state, cu_seqlens)
    backend = _check_backend(backend)
    tensors = (q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, ssm_state_indices, num_accepted_tokens)
    needs_grad = _requires_grad(q, k, v, g, beta, initial_state, A_log, dt_bias)
    if inplace_final_state:
        if needs_grad:
            raise ValueError("inplace_final_state=True is for inference only: run under torch.no_grad()")
        return ops.call("recurrent_kda_inplace", problem, opts, tensors, backend, written=initial_state), None
    if pooled and needs_grad:
        raise ValueError("ssm_state_indices / num_accepted_tokens are for inference only: run under torch.no_grad()")
    o, final = ops.call("recurrent_kda_fwd", problem, opts, tensors, bool(output_final_state), backend,
                        needs_grad=needs_grad)
    return o, (final if output_final_state else None)


def explain(q, k, v, g, beta, op: str = "chunk", **kwargs) -> dispatch.Choice:
    """Which backend (and config) a ``chunk_kda`` (``op="chunk"``) or ``fused_recurrent_kda``
    (``op="recurrent"``) call with these arguments would use, and why each other backend would not;
    ``op="chunk_backward"``: which backend computes the gradients of that ``chunk_kda`` call, and whether its
    config comes from a tuned table (which one, which bucket) or is the backend's default.
    Nothing is computed; ``print(explain(...))`` gives a readable report."""
    ops = dispatch.OPS + ("chunk_backward",)
    if op not in ops:
        raise ValueError(f"op must be one of {ops}, got {op!r}")
    kwargs = dict(kwargs)
    backend = _check_backend(kwargs.pop("backend", None))
    if "transpose_state_layout" in kwargs:
        kwargs["state_v_first"] = legacy_state_layout(kwargs, kwargs.get("state_v_first", False))
    checked = ("initial_state", "cu_seqlens", "cu_seqlens_cpu", "A_log", "dt_bias", "scale",
               "use_qk_l2norm_in_kernel", "use_gate_in_kernel", "use_beta_sigmoid_in_kernel", "allow_neg_eigval",
               "safe_gate", "lower_bound", "chunk_size", "state_v_first")
    call_only = ("output_final_state", "ssm_state_indices", "num_accepted_tokens", "inplace_final_state",
                 "disable_recompute", "return_intermediate_states")
    reject_unknown_keywords({key: kwargs[key] for key in kwargs if key not in checked + call_only}, "explain")
    a = kwargs
    problem, opts = _check(q, k, v, g, beta, state_is_pool=a.get("ssm_state_indices") is not None,
                           **{key: a[key] for key in checked if key in a})
    if op == "recurrent":
        check_serving(problem, a.get("initial_state"), a.get("ssm_state_indices"), a.get("num_accepted_tokens"),
                      bool(a.get("inplace_final_state")), a.get("cu_seqlens"))
    elif a.get("ssm_state_indices") is not None or a.get("inplace_final_state"):
        check_chunk_pool(problem, a.get("initial_state"), a.get("ssm_state_indices"),
                         bool(a.get("inplace_final_state")), bool(a.get("return_intermediate_states")),
                         a.get("cu_seqlens"))
    if op == "chunk_backward":
        call = dispatch.KDACall("chunk", problem, opts, q, k, v, g, beta, a.get("initial_state"), a.get("cu_seqlens"),
                                a.get("A_log"), a.get("dt_bias"), output_final_state=bool(a.get("output_final_state")))
        choice = dispatch.choose_backward(call, backend or None)
        trainer = dispatch.training_backend(call, backend or None)
        if trainer is None:
            return choice
        kept = ("it keeps tensors this backward reads instead of forming them again" if trainer is choice.backend else
                "this backward does not read what it keeps and recomputes")
        return dataclasses.replace(choice, reason=f"{choice.reason}; under autograd the forward runs on "
                                                  f"'{trainer.name}': {kept}")
    call = dispatch.KDACall(op, problem, opts, q, k, v, g, beta, a.get("initial_state"), a.get("cu_seqlens"),
                            a.get("A_log"), a.get("dt_bias"),
                            output_final_state=bool(a.get("output_final_state") or a.get("inplace_final_state")),
                            ssm_state_indices=a.get("ssm_state_indices"),
                            num_accepted_tokens=a.get("num_accepted_tokens"),
                            # a chunk call updates a plain (unpooled) state after the kernels, on any backend
                            inplace_final_state=bool(a.get("inplace_final_state")) and (
                                op == "recurrent" or a.get("ssm_state_indices") is not None))
    return dispatch.choose(call, backend or None)
