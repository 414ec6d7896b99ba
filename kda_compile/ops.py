"""``torch.library`` custom ops in the ``kda_compile`` namespace.

The ops are what ``torch.compile`` sees: opaque nodes with fake (meta) implementations, so a model traces
with ``fullgraph=True``; dispatch to a backend happens inside, at run time.  Autograd goes through
``kda_compile::kda_bwd``, itself an op that dispatches to a backend's backward kernels
(:func:`kda_compile.dispatch.choose_backward`), so compiled training graphs stay whole too.

    chunk_kda_fwd          (o, final_state)        chunk form, differentiable
    chunk_kda_fwd_train    (o, final_state, kept)  chunk form under autograd: plus what the backward reads back
    chunk_kda_fwd_states   (o, final_state, h)     chunk form + state entering each chunk (inference only)
    chunk_kda_pooled       (o, final_state)        chunk form, states in a pool (inference only, may mutate it)
    recurrent_kda_fwd      (o, final_state)        token recurrence (decode), differentiable without a pool
    recurrent_kda_inplace  o                       token recurrence writing the new state into the pool
    kda_bwd                gradients of all tensor inputs (from the inputs, and what the forward kept)

The ops are defined with ``torch.library.Library`` (schema, kernel, fake) and, for the two differentiable ones,
an autograd kernel written here (:func:`_differentiable`), rather than with ``torch.library.custom_op``: its
generic argument handling cost about 100 µs per call with grad enabled or a pool written in place
(bench/bench_overhead.py).  Mutating ops bump their state argument's version counter.

A tensor output that the caller did not ask for (the final state) is returned with 0 elements, since custom
ops cannot return None; :mod:`kda_compile.api` maps it back to None.

Plain eager inference (:func:`eager_inference`: nothing traces, compiles, profiles or records a gradient) skips
the dispatcher: :func:`call` runs the op's kernel body (``run_chunk``, ``run_chunk_pooled``, ``run_recurrent``,
``run_recurrent_inplace``) with the problem and options the API has already checked.  The result is the same; what
is saved is the dispatcher's entry and the options' round trip through the schema's scalars, about a third of
the per-call host time (bench/bench_overhead.py).
"""
from __future__ import annotations

import torch
from torch import _C
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from . import dispatch
from .checks import Problem
from .reference import KDAOptions, compute_dtype

_INPUTS = "Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor? initial_state, Tensor? cu_seqlens, " \
          "Tensor? A_log, Tensor? dt_bias"
_SERVING = "Tensor? ssm_state_indices, Tensor? num_accepted_tokens"
# The options follow the tensors as positional scalars; KDAOptions defines their names, types and order.
_OPTIONS = KDAOptions.op_schema()
_N_OPTIONS = KDAOptions.op_arg_count()
_N_INPUTS = _INPUTS.count("Tensor")
_N_SERVING = _SERVING.count("Tensor")
# Dispatch-key state of plain eager code, recorded at import (see kda_bwd).
_EAGER_DISPATCH_TLS = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


def _options(rest) -> tuple[KDAOptions, tuple]:
    """Split the scalars after an op's tensors into its :class:`KDAOptions` and the op's own trailing ones."""
    return KDAOptions.from_op_args(rest[:_N_OPTIONS]), tuple(rest[_N_OPTIONS:])


def _problem(q, v, cu_seqlens) -> Problem:
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return Problem(B, T, H, v.shape[2], K, v.shape[3], N, cu_seqlens is not None, q.dtype, q.device)


def _state_shape(q, v, N: int, state_v_first: bool):
    K, HV, V = q.shape[-1], v.shape[2], v.shape[3]
    return (N, HV, V, K) if state_v_first else (N, HV, K, V)


def _no_state(q: torch.Tensor) -> torch.Tensor:
    """Stand-in for a final state nobody asked for (custom ops cannot return None)."""
    return q.new_empty(0, dtype=torch.float32)


def eager_inference(tensors, needs_grad: bool) -> bool:
    """Whether a call may run its op's kernel body directly: plain eager code (not compiling or exporting, no
    dispatch or function mode, no functorch transform, no profiler recording op names), plain tensors off the
    meta device, and no gradient to record (``needs_grad``)."""
    if needs_grad or torch.compiler.is_compiling() or _C._is_torch_function_mode_enabled() \
            or _C._are_functorch_transforms_active() or torch.autograd._profiler_enabled() \
            or _current_dispatch_mode() is not None:
        return False
    return all(t is None or (type(t) is torch.Tensor and not t.is_meta) for t in tensors)


def _bump_version(state: torch.Tensor) -> None:
    """What the dispatcher's ADInplaceOrView kernel does for a written argument (nothing in inference mode)."""
    if not torch.is_inference_mode_enabled() and not state.is_inference():
        torch.autograd.graph.increment_version(state)


# ------------------------------------------------------------------------------------------- chunk fwd

CHUNK_FWD = f"({_INPUTS}, {_OPTIONS}, bool output_final_state, str backend) -> (Tensor, Tensor)"


def run_chunk(problem, opts, q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, output_final_state,
              backend):
    """The kernel body of ``chunk_kda_fwd``."""
    call = dispatch.KDACall("chunk", problem, opts, q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias,
                            output_final_state=output_final_state)
    o, final = dispatch.run(call, backend or None)
    return o, (final if output_final_state and final is not None else _no_state(q))


def chunk_kda_fwd(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, *rest):
    opts, (output_final_state, backend) = _options(rest)
    return run_chunk(_problem(q, v, cu_seqlens), opts, q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias,
                     output_final_state, backend)


def chunk_kda_fwd_fake(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, *rest):
    opts, (output_final_state, _backend) = _options(rest)
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    state_dtype = compute_dtype(q.dtype)
    final = (q.new_empty(_state_shape(q, v, N, opts.state_v_first), dtype=state_dtype) if output_final_state
             else _no_state(q))
    return torch.empty_like(v, memory_format=torch.contiguous_format), final


# ------------------------------------------------------------------------------ chunk fwd under autograd

CHUNK_FWD_TRAIN = f"({_INPUTS}, {_OPTIONS}, bool output_final_state, str backend) -> (Tensor, Tensor, Tensor[])"


def _training_call(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts, output_final_state):
    return dispatch.KDACall("chunk", _problem(q, v, cu_seqlens), opts, q, k, v, g, beta, initial_state, cu_seqlens,
                            A_log, dt_bias, output_final_state=output_final_state)


def chunk_kda_fwd_train(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, *rest):
    """``chunk_kda_fwd`` for autograd: ``(o, final_state, kept)``, ``kept`` what the backend that will compute the
    gradients keeps for them (dispatch.training_backend; empty when none does).  The fake implementation makes the
    same decision when a graph is traced, from the registered backends and KDA_COMPILE_BACKEND: changing either
    after compiling needs a recompile (``torch.compiler.reset()``)."""
    opts, (output_final_state, backend) = _options(rest)
    call = _training_call(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts, output_final_state)
    trainer = dispatch.training_backend(call, backend or None)
    if trainer is None:
        o, final = dispatch.run(call, backend or None)
        kept = []
    else:
        o, final, kept = dispatch.run_training(call, trainer, backend or None)
    return o, (final if output_final_state and final is not None else _no_state(q)), list(kept)


def chunk_kda_fwd_train_fake(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, *rest):
    opts, (output_final_state, backend) = _options(rest)
    o, final = chunk_kda_fwd_fake(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, *rest)
    call = _training_call(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts, output_final_state)
    trainer = dispatch.training_backend(call, backend or None)
    kept = [q.new_empty(shape, dtype=dtype) for shape, dtype in trainer.kept_shapes(call)] if trainer else []
    return o, final, kept


# -------------------------------------------------------------------------------- chunk fwd + chunk states

CHUNK_FWD_STATES = f"({_INPUTS}, {_OPTIONS}, str backend) -> (Tensor, Tensor, Tensor)"


def chunk_kda_fwd_states(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, *rest):
    opts, (backend,) = _options(rest)
    call = dispatch.KDACall("chunk", _problem(q, v, cu_seqlens), opts, q, k, v, g, beta, initial_state,
                            cu_seqlens, A_log, dt_bias, output_final_state=True)
    return dispatch.run_states(call, backend or None)


def chunk_kda_fwd_states_fake(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, *rest):
    opts, _backend = _options(rest)
    if cu_seqlens is None:
        B, NT = q.shape[0], -(-q.shape[1] // opts.chunk_size)
    else:  # total number of chunks depends on the offsets' values
        B, NT = 1, torch.library.get_ctx().new_dynamic_size()
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    state = _state_shape(q, v, N, opts.state_v_first)
    h = q.new_empty((B, NT, *state[1:]), dtype=k.dtype)
    return torch.empty_like(v), q.new_empty(state, dtype=compute_dtype(q.dtype)), h


# ------------------------------------------------------------------------------- chunk fwd, state pool

CHUNK_POOLED = ("(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor(a!)? initial_state, "
                f"Tensor? cu_seqlens, Tensor? A_log, Tensor? dt_bias, Tensor? ssm_state_indices, {_OPTIONS}, bool output_final_state, "
                "bool inplace_final_state, str backend) -> (Tensor, Tensor)")


def chunk_kda_pooled(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, ssm_state_indices, *rest):
    """Chunk form with the initial states read from pool slots (and, in place, the final states written back)."""
    opts, (output_final_state, inplace_final_state, backend) = _options(rest)
    return run_chunk_pooled(_problem(q, v, cu_seqlens), opts, q, k, v, g, beta, initial_state, cu_seqlens, A_log,
                            dt_bias, ssm_state_indices, output_final_state, inplace_final_state, backend)


def run_chunk_pooled(problem, opts, q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, ssm_state_indices,
                     output_final_state, inplace_final_state, backend):
    """The kernel body of ``chunk_kda_pooled``."""
    pooled = ssm_state_indices is not None
    call = dispatch.KDACall("chunk", problem, opts, q, k, v, g, beta, initial_state,
                            cu_seqlens, A_log, dt_bias, output_final_state=True,
                            ssm_state_indices=ssm_state_indices, inplace_final_state=inplace_final_state and pooled)
    o, final = dispatch.run(call, backend or None)
    if inplace_final_state and not pooled:  # a plain [N, ...] state updated in place: any backend
        initial_state.copy_(final)
    return o, (final if output_final_state and not inplace_final_state and final is not None else _no_state(q))


def chunk_kda_pooled_fake(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, ssm_state_indices, *rest):
    opts, (output_final_state, inplace_final_state, _backend) = _options(rest)
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final = (q.new_empty(_state_shape(q, v, N, opts.state_v_first), dtype=compute_dtype(q.dtype))
             if output_final_state and not inplace_final_state else _no_state(q))
    return torch.empty_like(v, memory_format=torch.contiguous_format), final


# ------------------------------------------------------------------------------------------- recurrent

RECURRENT_FWD = f"({_INPUTS}, {_SERVING}, {_OPTIONS}, bool output_final_state, str backend) -> (Tensor, Tensor)"


def recurrent_kda_fwd(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, ssm_state_indices,
                      num_accepted_tokens, *rest):
    opts, (output_final_state, backend) = _options(rest)
    return run_recurrent(_problem(q, v, cu_seqlens), opts, q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias,
                         ssm_state_indices, num_accepted_tokens, output_final_state, backend)


def run_recurrent(problem, opts, q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, ssm_state_indices,
                  num_accepted_tokens, output_final_state, backend):
    """The kernel body of ``recurrent_kda_fwd``."""
    call = dispatch.KDACall("recurrent", problem, opts, q, k, v, g, beta, initial_state,
                            cu_seqlens, A_log, dt_bias, output_final_state=output_final_state,
                            ssm_state_indices=ssm_state_indices, num_accepted_tokens=num_accepted_tokens)
    o, final = dispatch.run(call, backend or None)
    return o, (final if output_final_state and final is not None else _no_state(q))


def recurrent_kda_fwd_fake(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, ssm_state_indices,
                           num_accepted_tokens, *rest):
    opts, (output_final_state, _backend) = _options(rest)
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final = (q.new_empty(_state_shape(q, v, N, opts.state_v_first), dtype=compute_dtype(q.dtype))
             if output_final_state else _no_state(q))
    return torch.empty_like(v, memory_format=torch.contiguous_format), final


RECURRENT_INPLACE = ("(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor(a!) initial_state, "
                     f"Tensor? cu_seqlens, Tensor? A_log, Tensor? dt_bias, {_SERVING}, {_OPTIONS}, "
                     "str backend) -> Tensor")


def recurrent_kda_inplace(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, ssm_state_indices,
                          num_accepted_tokens, *rest):
    opts, (backend,) = _options(rest)
    return run_recurrent_inplace(_problem(q, v, cu_seqlens), opts, q, k, v, g, beta, initial_state, cu_seqlens, A_log,
                                 dt_bias, ssm_state_indices, num_accepted_tokens, backend)


def run_recurrent_inplace(problem, opts, q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias,
                          ssm_state_indices, num_accepted_tokens, backend):
    """The kernel body of ``recurrent_kda_inplace``."""
    call = dispatch.KDACall("recurrent", problem, opts, q, k, v, g, beta, initial_state,
                            cu_seqlens, A_log, dt_bias, output_final_state=True,
                            ssm_state_indices=ssm_state_indices, num_accepted_tokens=num_accepted_tokens,
                            inplace_final_state=True)
    o, _ = dispatch.run(call, backend or None)
    return o


def recurrent_kda_inplace_fake(q, k, v, *rest):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


# -------------------------------------------------------------------------------------------- backward

KDA_BWD = (f"(Tensor grad_o, Tensor? grad_final_state, {_INPUTS}, Tensor[] kept, {_OPTIONS}, str backend) -> "
           "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def kda_bwd(grad_o, grad_final_state, q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, kept, *rest):
    """Gradients of (q, k, v, g, beta, initial_state, A_log, dt_bias); absent inputs get 0-element tensors.
    The dispatch picks the backend and config (dispatch.choose_backward): the one named on the forward call when it
    has a backward for it, else the tuned tables' backward entry (``chunk_bwd``) of the call's bucket, else the
    first of the default order that has one (the reference: autograd through the chunkwise form).  ``kept``:
    what ``chunk_kda_fwd_train`` kept (may be empty)."""
    opts, (backend,) = _options(rest)
    call = dispatch.KDACall("chunk", _problem(q, v, cu_seqlens), opts, q, k, v, g, beta, initial_state, cu_seqlens,
                            A_log, dt_bias, output_final_state=grad_final_state is not None)
    # A custom op's kernel runs with the autograd keys (and, under a dispatch mode, most others) excluded;
    # restore the dispatch state of ordinary eager code, which the reference's autograd needs.
    with torch._C._ForceDispatchKeyGuard(*_EAGER_DISPATCH_TLS):
        grads = dispatch.run_backward(call, grad_o, grad_final_state, backend or None, tuple(kept))
    inputs = (q, k, v, g, beta, initial_state, A_log, dt_bias)
    return tuple(q.new_empty(0) if x is None else
                 (torch.zeros_like(x, memory_format=torch.contiguous_format) if d is None else d.to(x.dtype).contiguous())
                 for x, d in zip(inputs, grads))


def kda_bwd_fake(grad_o, grad_final_state, q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, kept,
                 *rest):
    inputs = (q, k, v, g, beta, initial_state, A_log, dt_bias)
    return tuple(q.new_empty(0) if x is None else torch.empty_like(x, memory_format=torch.contiguous_format)
                 for x in inputs)


def _backward(ctx, grad_o, grad_final_state):
    """Gradients of the tensor inputs (q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias)."""
    q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, *kept = ctx.saved_tensors
    if grad_final_state is not None and grad_final_state.numel() == 0:
        grad_final_state = None
    grads = torch.ops.kda_compile.kda_bwd(grad_o.contiguous(), grad_final_state, q, k, v, g, beta, initial_state,
                                          cu_seqlens, A_log, dt_bias, kept, *ctx.options, ctx.backend)
    dq, dk, dv, dg, dbeta, dh0, dA, ddt = grads
    return (dq, dk, dv, dg, dbeta, dh0 if initial_state is not None else None, None,
            dA if A_log is not None else None, ddt if dt_bias is not None else None)


def _differentiable(op, n_serving: int, training_op=None):
    """The autograd kernel of a differentiable op: an ``autograd.Function`` around the op's kernel when an
    input requires grad, else a straight redispatch.  ``training_op``: run instead of the op's kernel under
    autograd, returning the op's outputs plus a list of tensors kept for the backward.  Written by hand instead of
    ``custom_op``'s ``register_autograd``, whose generic argument handling costs about 100 µs per call."""
    n_scalars = _N_OPTIONS + 2   # options, output_final_state, backend

    class KDAFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, keyset, *args):
            kept = []
            with _C._AutoDispatchBelowAutograd():
                if training_op is None:
                    out = op.redispatch(keyset & _C._after_autograd_keyset, *args)
                else:
                    *out, kept = training_op(*args)
                    out = tuple(out)
            ctx.save_for_backward(*args[:_N_INPUTS], *kept)
            scalars = args[_N_INPUTS + n_serving:]
            ctx.options, ctx.backend = tuple(scalars[:_N_OPTIONS]), scalars[-1]  # backend= forces the backward
            return out

        @staticmethod
        def backward(ctx, grad_o, grad_final_state):
            return (None,) + _backward(ctx, grad_o, grad_final_state) + (None,) * (n_serving + n_scalars)

    def kernel(keyset, *args):
        if _C.is_grad_enabled() and _C._any_requires_grad(*args):
            return KDAFunction.apply(keyset, *args)
        with _C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & _C._after_autograd_keyset, *args)
    return kernel


def _mutation(op, positions):
    """The ADInplaceOrView kernel of an op that writes into its arguments at ``positions``: bump their
    version counters (so autograd notices the write), then run the op."""
    def kernel(keyset, *args):
        for i in positions:
            if args[i] is not None:
                torch.autograd.graph.increment_version(args[i])
        return op.redispatch(keyset & _C._after_ADInplaceOrView_keyset, *args)
    return kernel


# ------------------------------------------------------------------------------------------ registration

_LIB = torch.library.Library("kda_compile", "FRAGMENT")


def _register(name: str, schema: str, impl, fake, *, differentiable_serving: int | None = None,
              mutated: tuple = (), training_op=None) -> None:
    """Define ``kda_compile::name`` with ``torch.library``: the kernel (all devices), its fake (for
    ``torch.compile`` and export), and, where it applies, its autograd and mutation kernels."""
    _LIB.define(name + schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"kda_compile::{name}", fake, lib=_LIB)
    op = getattr(torch.ops.kda_compile, name).default
    if differentiable_serving is not None:
        _LIB.impl(name, _differentiable(op, differentiable_serving, training_op), "Autograd", with_keyset=True)
    if mutated:
        _LIB.impl(name, _mutation(op, mutated), "ADInplaceOrView", with_keyset=True)


_STATE_ARG = 5   # position of initial_state (the pool) in the ops that write it
_register("chunk_kda_fwd_train", CHUNK_FWD_TRAIN, chunk_kda_fwd_train, chunk_kda_fwd_train_fake)
_register("chunk_kda_fwd", CHUNK_FWD, chunk_kda_fwd, chunk_kda_fwd_fake, differentiable_serving=0,
          training_op=torch.ops.kda_compile.chunk_kda_fwd_train.default)
_register("chunk_kda_fwd_states", CHUNK_FWD_STATES, chunk_kda_fwd_states, chunk_kda_fwd_states_fake)
_register("chunk_kda_pooled", CHUNK_POOLED, chunk_kda_pooled, chunk_kda_pooled_fake, mutated=(_STATE_ARG,))
_register("recurrent_kda_fwd", RECURRENT_FWD, recurrent_kda_fwd, recurrent_kda_fwd_fake,
          differentiable_serving=_N_SERVING)
_register("recurrent_kda_inplace", RECURRENT_INPLACE, recurrent_kda_inplace, recurrent_kda_inplace_fake,
          mutated=(_STATE_ARG,))
_register("kda_bwd", KDA_BWD, kda_bwd, kda_bwd_fake)


# Kernel bodies the API may run without the dispatcher (see call).
_BODIES = {"chunk_kda_fwd": run_chunk, "chunk_kda_pooled": run_chunk_pooled, "recurrent_kda_fwd": run_recurrent,
           "recurrent_kda_inplace": run_recurrent_inplace}


def call(name: str, problem: Problem, opts: KDAOptions, tensors: tuple, *trailing, needs_grad: bool = False,
         written: torch.Tensor | None = None):
    """Op ``kda_compile::name`` on its ``tensors`` and ``trailing`` scalars (those after the options): its kernel
    body straight away in plain eager inference (:func:`eager_inference`), else through the dispatcher.
    ``written``: the argument the call writes in place, whose version the direct route bumps as the
    dispatcher's ADInplaceOrView kernel would."""
    if eager_inference(tensors, needs_grad):
        out = _BODIES[name](problem, opts, *tensors, *trailing)
        if written is not None:
            _bump_version(written)
        return out
    return getattr(torch.ops.kda_compile, name)(*tensors, *opts.as_op_args(), *trailing)
