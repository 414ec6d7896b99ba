"""Backend registry and per-call dispatch.

Backends are declared, not branched: each is a :class:`Backend` with a ``supports(call) -> reason | None``
check.  For every call the dispatch picks, in order of precedence:

1. an explicit ``backend=`` argument (an error if that backend cannot run the call),
2. the ``KDA_COMPILE_BACKEND`` environment variable (a preference: falls back, with the reason, if it cannot),
3. the table ``python -m kda_compile.autotune`` measured on this GPU (:mod:`kda_compile.tuning_table`),
4. a table we measured and ship for this GPU model, else one of the same compute capability, marked borrowed
   (``kda_compile/tables/``),
5. the default order, :data:`DEFAULT_ORDER` (fastest measured first; the reference last, it runs everything).
   It is fixed here, not by which module happened to be imported first.

A forced or preferred backend still takes its kernel config from the tables when they measured it.  A backend the
autotune found outside the dtype's tolerance is never picked for that dtype unless named with ``backend=``.
The gradients of a chunk call (:func:`choose_backward`) follow the same order with the tables' backward entries
(bucket op ``chunk_bwd``), except that a backend named for the call without a backward for it falls back.

Each kernel package has a ``backend`` module that registers its backend through :func:`register_backend` when it
is imported (on first use of the dispatch); a package that cannot import records the import error, and
:func:`explain` and ``python -m kda_compile info`` show it.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import decision_cache, tuning_table
from .buckets import BACKWARD_OP
from .checks import Problem
from .reference import KDAOptions

ENV_BACKEND = "KDA_COMPILE_BACKEND"
OPS = ("chunk", "recurrent")
# Backend modules imported on first use; each registers its backend when it imports.
PLUGIN_MODULES = {"triton": "kda_compile.kernels_triton.backend", "tilelang": "kda_compile.kernels_tl.backend"}
# Default preference, fastest measured first (H100 and H200, bench/RESULTS.md: the Triton forward about half the
# TileLang forward's time at every standard shape); backends not listed go before the reference.
DEFAULT_ORDER = ("triton", "tilelang", "reference")


@dataclass
class KDACall:
    """Everything a backend needs to run one call: tensors as the user gave them, options and sizes."""

    op: str                                   # "chunk" or "recurrent"
    problem: Problem
    opts: KDAOptions
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    initial_state: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    A_log: torch.Tensor | None = None
    dt_bias: torch.Tensor | None = None
    output_final_state: bool = False
    ssm_state_indices: torch.Tensor | None = None   # state slots in a pool (chunk: 1-D only)
    num_accepted_tokens: torch.Tensor | None = None  # recurrent only: speculative decoding
    inplace_final_state: bool = False                # write the final state back into the pool


@dataclass(frozen=True)
class Backend:
    """A way to run KDA.  ``run(call, config) -> (o, final_state or None)``; ``supports(call)`` returns
    None when it can run the call, else the reason it cannot.  ``configs(call)`` lists the kernel configs
    (tile sizes, stages, warps/threads) worth trying for that call: the autotuner's search space;
    ``default_config(call)`` is the one used when no tuned table says otherwise."""

    name: str
    supports: Callable[[KDACall], str | None]
    run: Callable[[KDACall, dict], tuple]
    description: str = ""
    default_config: Callable[[KDACall], dict] = field(default=lambda call: {})
    configs: Callable[[KDACall], list] = field(default=lambda call: [{}])
    # Check used when the backend is named explicitly (backend=...); None: the same as ``supports``.
    supports_forced: Callable[[KDACall], str | None] | None = None
    # ``check_config(op, config)`` raises ValueError for a config this backend does not understand (unknown keys,
    # bad values), before anything runs; tuned tables are checked with it.
    check_config: Callable[[str, dict], None] = field(default=lambda op, config: None)
    # Chunk calls only: ``run_states(call, config) -> (o, final_state, h)`` with ``h`` the state entering
    # each chunk (``chunk_kda(return_intermediate_states=True)``); None: the backend cannot return them.
    run_states: Callable[[KDACall, dict], tuple] | None = None
    # Chunk calls only: ``run_backward(call, config, do, dht) -> (dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias)``
    # (None for an input that is None), ``do`` the output's gradient and ``dht`` the final state's (or None);
    # ``supports_backward(call)`` says why it cannot (None: it can).  None: no backward here.
    run_backward: Callable | None = None
    supports_backward: Callable[[KDACall], str | None] = field(default=lambda call: None)
    # The backward's kernel configs (``check_config("chunk_bwd", config)`` checks one): the one used without a
    # tuned table, and the autotuner's search space (the backward's own knobs and those of the forward's stages
    # that its recompute runs).
    backward_default_config: Callable[[KDACall], dict] = field(default=lambda call: {})
    backward_configs: Callable[[KDACall], list] = field(default=lambda call: [{}])
    # Chunk calls only: ``run_training(call, config) -> (o, final_state or None, kept)``, the forward of a call
    # whose gradients this backend computes, also returning ``kept``: tensors its backward would otherwise form
    # again, passed back as ``run_backward(..., kept=kept)``.  ``kept_shapes(call)`` lists their ``(shape,
    # dtype)``, from the inputs' shapes alone (the ops' fake implementations use it).  None: the backward
    # recomputes everything.
    run_training: Callable | None = None
    kept_shapes: Callable[[KDACall], list] = field(default=lambda call: [])
    # Chunk calls with a state pool (``ssm_state_indices``, ``inplace_final_state``): True when ``run`` reads
    # the initial states from the pool slots (and writes the final states back in place).
    chunk_state_pool: bool = False
    # Pooled calls: True when a negative slot (padding) skips its sequence.  Without it the default dispatch
    # does not send pooled calls here (a backend named explicitly still runs them: no negative slots then).
    padding_slots: bool = False


@dataclass
class Choice:
    """The outcome of dispatch: the backend, its kernel config, why, and why each other backend was not
    used.  ``str(choice)`` is what :func:`explain` prints."""

    op: str
    backend: Backend
    config: dict
    reason: str
    rejected: dict[str, str]

    def __str__(self) -> str:
        lines = [f"kda_compile {self.op}: backend '{self.backend.name}' ({self.reason})"]
        if self.config:
            lines.append("  config: " + ", ".join(f"{k}={v}" for k, v in sorted(self.config.items())))
        for name, why in self.rejected.items():
            lines.append(f"  not {name}: {why}")
        return "\n".join(lines)


_REGISTRY: dict[str, Backend] = {}
_ORDER: list[str] = []            # default preference, fastest first
_UNAVAILABLE: dict[str, str] = {}  # backend name -> why it did not register
_ANCHORS: dict[str, str] = {}      # backend name -> the backend it is preferred over (register_backend(before=))
_plugins_loaded = False
_DECISIONS = decision_cache.DECISIONS   # cleared whenever the registry changes


def _with_chunk_pool_check(backend: Backend) -> Backend:
    """Chunk calls with a state pool (``ssm_state_indices``) go only to backends that declare
    ``chunk_state_pool``, and by default pooled calls only to those that declare ``padding_slots``; for the
    others ``supports`` gives the reason, so the dispatch falls back."""
    if backend.chunk_state_pool and backend.padding_slots:
        return backend

    def checked(check, default_order: bool):
        def supports(call: KDACall) -> str | None:
            if call.ssm_state_indices is not None:
                if call.op == "chunk" and not backend.chunk_state_pool:
                    return "chunk calls with a state pool (ssm_state_indices) are not implemented by this backend"
                if default_order and not backend.padding_slots:
                    return ("negative (padding) slots in ssm_state_indices are not skipped by this backend; it runs "
                            "pooled calls only when named with backend=")
            return check(call)
        return supports
    return dataclasses.replace(backend, supports=checked(backend.supports, True),
                               supports_forced=checked(backend.supports_forced or backend.supports, False))


def _rank(name: str) -> float:
    if name in _ANCHORS and _ANCHORS[name] in _REGISTRY:
        return _rank(_ANCHORS[name]) - 0.5
    return DEFAULT_ORDER.index(name) if name in DEFAULT_ORDER else DEFAULT_ORDER.index("reference") - 0.5


def register_backend(backend: Backend, *, before: str | None = None) -> None:
    """Add (or replace) a backend.  Its place in the default order is :data:`DEFAULT_ORDER`'s; a backend not
    listed there goes just before the reference, or just before ``before`` when given."""
    _REGISTRY[backend.name] = _with_chunk_pool_check(backend)
    _UNAVAILABLE.pop(backend.name, None)
    _DECISIONS.clear()
    if before is not None:
        _ANCHORS[backend.name] = before
    _ORDER[:] = sorted(_REGISTRY, key=_rank)


def unregister_backend(name: str) -> None:
    """Remove a backend (tests, or a plugin that finds at run time that it cannot work)."""
    _REGISTRY.pop(name, None)
    _ANCHORS.pop(name, None)
    _DECISIONS.clear()
    if name in _ORDER:
        _ORDER.remove(name)


def mark_unavailable(name: str, reason: str) -> None:
    """Record why a backend did not register (shown by explain)."""
    if name not in _REGISTRY:
        _UNAVAILABLE[name] = reason
        _DECISIONS.clear()


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    importlib.import_module("kda_compile.reference_backend")  # always present
    for name, module in PLUGIN_MODULES.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # a missing optional compiler degrades to the next backend; keep its error
            mark_unavailable(name, f"{module} failed to import: {type(exc).__name__}: {exc}")


def backends() -> list[str]:
    """Registered backend names in default preference order."""
    _load_plugins()
    return list(_ORDER)


def get_backend(name: str) -> Backend:
    _load_plugins()
    if name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(_UNAVAILABLE))
        why = f": {_UNAVAILABLE[name]}" if name in _UNAVAILABLE else f"; known backends: {known}"
        raise ValueError(f"backend {name!r} is not available{why}")
    return _REGISTRY[name]


def config_error(backend: Backend, op: str, config: dict) -> str | None:
    """Why ``config`` is not a valid config of ``backend`` for ``op`` (unknown keys, bad values), or None."""
    try:
        backend.check_config(op, config)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def _tuned_config(record: dict | None, backend: Backend, call: KDACall) -> dict:
    """The config the tables measured for ``backend`` in this bucket (when still valid), else the default."""
    return _config_from_table(record, backend, call.op, lambda: backend.default_config(call))[0]


def _config_from_table(record: dict | None, backend: Backend, op: str, default: Callable[[], dict]) -> tuple:
    """``(config, where from)``: the config ``record`` holds for ``backend`` (its winner's, else its
    ``per_backend`` entry) when valid for ``op``, else ``default()``; "where from" says which, and why not."""
    if not record:
        return default(), "default config (no tuned table entry)"
    if record.get("backend") == backend.name:
        config = record.get("config", {})
    else:
        config = record.get("per_backend", {}).get(backend.name, {}).get("config")
    if config is None:
        return default(), f"default config (the tuned entry is for {record.get('backend')})"
    bad = config_error(backend, op, config)
    if bad:
        return default(), f"default config (the tuned one is not valid in this version: {bad})"
    return dict(config), f"tuned config of bucket {record.get('bucket', '?')}"


def _table_choice(record: dict, source: str, op: str, reason: Callable[[Backend], str | None], unfit: dict,
                  rejected: dict, label: str) -> Choice | None:
    """The table's pick for ``op`` when its backend can run it (``reason(backend)`` None, not unfit for the dtype)
    and its config is valid; else None, with why in ``rejected``."""
    name = record.get("backend")
    why_not = unfit.get(name) or (reason(_REGISTRY[name]) if name in _REGISTRY else "not registered in this process")
    if why_not is None:
        bad = config_error(_REGISTRY[name], op, record.get("config", {}))
        why_not = f"its tuned config is not valid in this version ({bad})" if bad else None
    if why_not is not None:
        rejected[f"{name} (from {source})"] = why_not
        return None
    timing = f", {record['time_ms']:.3g} ms at {record.get('shape', 'its shape')}" if "time_ms" in record else ""
    return Choice(label, _REGISTRY[name], dict(record.get("config", {})),
                  f"{source}, bucket {record.get('bucket', '?')}{timing}", rejected)


def choose(call: KDACall, backend: str | None = None) -> Choice:
    """Pick backend and config for ``call`` (see the module docstring for the precedence).  The decision is
    cached per :func:`decision_key` (see :mod:`kda_compile.decision_cache`)."""
    _load_plugins()
    return decision_cache.cached(call, backend, _choose)


def _choose(call: KDACall, backend: str | None = None) -> Choice:
    rejected: dict[str, str] = dict(_UNAVAILABLE)
    found = tuning_table.lookup(call)
    record, source = found if found else (None, None)
    unfit = tuning_table.unfit_backends(call)  # never picked unless named with backend=
    if backend:
        chosen = get_backend(backend)
        why_not = (chosen.supports_forced or chosen.supports)(call)
        if why_not:
            raise ValueError(f"backend={backend!r} cannot run this {call.op} call: {why_not}")
        return Choice(call.op, chosen, _tuned_config(record, chosen, call), "forced by backend= argument", rejected)

    preferred = os.environ.get(ENV_BACKEND, "").strip()
    if preferred:
        if preferred not in _REGISTRY:
            rejected[preferred] = f"named by {ENV_BACKEND} but not registered"
        else:
            why_not = unfit.get(preferred) or _REGISTRY[preferred].supports(call)
            if why_not is None:
                chosen = _REGISTRY[preferred]
                return Choice(call.op, chosen, _tuned_config(record, chosen, call), f"{ENV_BACKEND}={preferred}",
                              rejected)
            rejected[preferred] = f"named by {ENV_BACKEND} but cannot run it: {why_not}"

    if record is not None:
        picked = _table_choice(record, source, call.op, lambda b: b.supports(call), unfit, rejected, call.op)
        if picked is not None:
            return picked

    for name in _ORDER:
        candidate = _REGISTRY[name]
        why_not = unfit.get(name) or candidate.supports(call)
        if why_not is None:
            reason = "first backend in default order that supports the call"
            if record is None:
                reason += " (no tuned table entry for this shape bucket)"
            return Choice(call.op, candidate, _tuned_config(record, candidate, call), reason, rejected)
        rejected.setdefault(name, why_not)
    raise RuntimeError("no KDA backend can run this call: " + "; ".join(f"{k}: {v}" for k, v in rejected.items()))


def backward_reason(backend: Backend, call: KDACall, forced: bool = False) -> str | None:
    """Why ``backend`` cannot compute the gradients of the chunk ``call`` (None: it can); ``forced``: checked as
    a backend named for the call (CPU tensors then run on the backends' CPU builds)."""
    if backend.run_backward is None:
        return "has no backward"
    check = (backend.supports_forced or backend.supports) if forced else backend.supports
    return check(call) or backend.supports_backward(call)


def choose_backward(call: KDACall, backend: str | None = None) -> Choice:
    """The backend and config that compute the gradients of a chunk ``call``, in order: the backend named on the
    forward call (or by ``KDA_COMPILE_BACKEND``) when it has a backward for the call; the tuned tables'
    ``chunk_bwd`` entry of the call's bucket (same lookup as the forward's: the user's table, then a shipped or
    borrowed one; an entry this version cannot run is skipped with the reason); the first backend of the
    default order with a backward (the reference always has one).  A named backend takes its tuned config when
    the tables measured it in this bucket, else its default.  ``explain(..., op="chunk_backward")`` prints it,
    with where the config came from.  Cached like :func:`choose`."""
    _load_plugins()
    return decision_cache.cached(call, backend, _choose_backward, op=BACKWARD_OP)


def _choose_backward(call: KDACall, backend: str | None = None) -> Choice:
    rejected: dict[str, str] = dict(_UNAVAILABLE)
    found = tuning_table.lookup(call, op=BACKWARD_OP)
    record, source = found if found else (None, None)
    unfit = tuning_table.unfit_backends(call, op=BACKWARD_OP)  # never picked unless named with backend=

    def choice(chosen: Backend, how: str) -> Choice:
        config, origin = _config_from_table(record, chosen, BACKWARD_OP, lambda: chosen.backward_default_config(call))
        if record is not None and not origin.startswith("default"):
            origin += f" ({source})"
        return Choice("chunk backward", chosen, config, f"{how}; {origin}", rejected)

    wanted = backend or os.environ.get(ENV_BACKEND, "").strip() or None
    if wanted:
        named = get_backend(wanted) if backend else _REGISTRY.get(wanted)
        if named is None:
            rejected[wanted] = f"named by {ENV_BACKEND} but not registered"
        else:
            why_not = backward_reason(named, call, forced=True) or (None if backend else unfit.get(wanted))
            if why_not is None:
                return choice(named, "forced by backend= argument" if backend else f"{ENV_BACKEND}={wanted}")
            rejected[wanted] = f"named for this call, but {why_not}; falling back"

    if record is not None:
        picked = _table_choice(record, source, BACKWARD_OP, lambda b: backward_reason(b, call), unfit, rejected,
                               "chunk backward")
        if picked is not None:
            return picked

    for name in _ORDER:
        candidate = _REGISTRY[name]
        why_not = unfit.get(name) or backward_reason(candidate, call)
        if why_not is None:
            return choice(candidate, "first backend in default order with a backward for the call")
        rejected.setdefault(name, why_not)
    raise RuntimeError("no KDA backend can run this backward: " + "; ".join(f"{k}: {v}" for k, v in rejected.items()))


def run_backward(call: KDACall, do: torch.Tensor, dht: torch.Tensor | None, backend: str | None = None,
                 kept: tuple = ()):
    """Gradients of a chunk ``call`` for the output gradient ``do`` and final-state gradient ``dht``:
    ``(dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias)``, None for absent inputs.  ``kept``: what the call's
    training forward kept (:func:`run_training`); used when the backend computing the gradients is the one that
    kept it, else ignored (that backend recomputes)."""
    choice = choose_backward(call, backend)
    if kept and choice.backend is training_backend(call, backend):
        return choice.backend.run_backward(call, choice.config, do, dht, kept=tuple(kept))
    return choice.backend.run_backward(call, choice.config, do, dht)


def training_backend(call: KDACall, backend: str | None = None) -> Backend | None:
    """The backend whose forward keeps intermediates for its own backward (``run_training``) in a differentiable
    chunk ``call``, or None (the plain forward runs and the backward recomputes): the backend named with
    ``backend=`` when it has a training forward and can run the call's forward and backward; else the one named by
    KDA_COMPILE_BACKEND, or unnamed the first of the default order, that can run both as :func:`choose` and
    :func:`choose_backward` check them (never one the tables found unfit for the dtype), if it has a training
    forward.  Decided from what the call's lengths do not change (device, dtypes, head dims, options, names,
    unfit verdicts), never from the tables' per-length choices, so that the ops' fake implementations, which may
    see symbolic lengths, decide the same; so the forward under autograd may run on another backend than the
    tables pick for it, and a backward the tables give to another backend recomputes (``explain`` says so)."""
    _load_plugins()
    if backend:
        named = get_backend(backend)
        # backward_reason checks the forward's support too (forced: as a named backend)
        ok = named.run_training is not None and backward_reason(named, call, forced=True) is None
        return named if ok else None
    unfit = {**tuning_table.unfit_backends(call), **tuning_table.unfit_backends(call, op=BACKWARD_OP)}
    wanted = os.environ.get(ENV_BACKEND, "").strip()
    if wanted in _REGISTRY:
        named = _REGISTRY[wanted]
        ok = wanted not in unfit and named.supports(call) is None and backward_reason(named, call, forced=True) is None
        return named if ok and named.run_training is not None else None
    for name in _ORDER:
        candidate = _REGISTRY[name]
        if name not in unfit and backward_reason(candidate, call) is None:   # supports, then the backward's
            return candidate if candidate.run_training is not None else None
    return None


def run_training(call: KDACall, trainer: Backend, backend: str | None = None):
    """The forward of a differentiable chunk ``call`` on ``trainer`` (:func:`training_backend`), with the config
    the forward's dispatch would give it: ``(o, final_state or None, kept)``."""
    choice = choose(call, backend)
    config = choice.config if choice.backend is trainer else _tuned_config(
        (tuning_table.lookup(call) or (None,))[0], trainer, call)
    return trainer.run_training(call, config)


def run(call: KDACall, backend: str | None = None):
    """Dispatch and execute ``call``; returns ``(o, final_state or None)``."""
    choice = choose(call, backend)
    return choice.backend.run(call, choice.config)


def run_states(call: KDACall, backend: str | None = None):
    """Execute a chunk ``call`` and also return the state entering each chunk: ``(o, final_state, h)``.

    With ``backend`` named, that backend runs it (an error if it cannot run the call or cannot return the
    states).  Otherwise the backend :func:`choose` picks runs it if it can return the states, else the first
    backend of the default order that can (the reference always can)."""
    choice = choose(call, backend)
    if choice.backend.run_states is not None:
        return choice.backend.run_states(call, choice.config)
    if backend:
        raise ValueError(f"backend={backend!r} cannot return the chunk states (return_intermediate_states=True); "
                         f"backends that can: {[n for n in _ORDER if _REGISTRY[n].run_states is not None]}")
    found = tuning_table.lookup(call)
    for name in _ORDER:
        candidate = _REGISTRY[name]
        if candidate.run_states is not None and candidate.supports(call) is None:
            return candidate.run_states(call, _tuned_config(found[0] if found else None, candidate, call))
    raise RuntimeError("no registered backend can return the chunk states (the reference backend should)")
