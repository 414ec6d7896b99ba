"""Cache of dispatch decisions, so that a serving loop pays for backend selection once per shape.

The key holds everything a backend's ``supports``, a tuned table's bucket and a default config may depend on:
the op, the :class:`~kda_compile.checks.Problem` (sizes, dtype, device), the options, which optional tensors
are present (and the state's dtype and contiguity), the serving flags, the ``backend=`` argument, the
environment variables the dispatch reads and, for float32 calls, whether PyTorch lets float32 matmuls use TF32
(a backend may refuse float32-accurate products; :mod:`kda_compile.matmul_precision`).  A decision is dropped when
the backend registry changes (:mod:`kda_compile.dispatch` clears :data:`DECISIONS`) or when the tuning tables are
reloaded (each decision remembers the tables it was made with and is used only while those are still the loaded
ones).
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from . import tuning_table
from .buckets import longest_sequence
from .matmul_precision import float32_allows_tf32

DECISIONS: dict = {}       # key -> (choice, tables key, tables object)
MAX_DECISIONS = 4096       # a bound for processes that see very many shapes; the cache starts over past it
_ENV = ("KDA_COMPILE_BACKEND", "KDA_COMPILE_CACHE_DIR", "XDG_CACHE_HOME", "HOME")
_ENV_KEYS = tuple(name.encode() for name in _ENV)


def environment() -> tuple:
    """The values of the environment variables the dispatch reads (None where unset; as bytes on POSIX, where
    they only key the cache).  On POSIX this reads ``os.environ``'s own byte-keyed mapping, which every
    ``os.environ`` assignment updates: ``os.environ.get`` of an unset name raises and catches a KeyError inside,
    0.6-0.9 µs per name and call on a serving loop's path."""
    data = getattr(os.environ, "_data", None)
    if os.name == "posix" and isinstance(data, dict):
        return tuple(map(data.get, _ENV_KEYS))
    return tuple(os.environ.get(name) for name in _ENV)


def _tensor_flags(x) -> tuple | None:
    return None if x is None else (x.dtype, x.dim(), x.is_contiguous())


def decision_key(call, backend: str | None, op: str | None = None) -> tuple:
    """What a dispatch decision for ``call`` depends on (``op``: the tuned op decided, when not the call's own,
    e.g. ``chunk_bwd`` for its backward).  No device tensor's values (nothing here syncs); the longest sequence
    of a varlen pack, which picks its bucket, is read only when the offsets are on the CPU
    (:func:`kda_compile.buckets.longest_sequence`)."""
    return (op or call.op, call.problem, longest_sequence(call), call.opts, _tensor_flags(call.initial_state),
            call.cu_seqlens is None,
            call.A_log is None, call.dt_bias is None, call.output_final_state,
            _tensor_flags(call.ssm_state_indices), call.num_accepted_tokens is None, call.inplace_final_state,
            backend, environment(),
            float32_allows_tf32() if call.problem.dtype is torch.float32 else None)


def cached(call, backend: str | None, choose: Callable, op: str | None = None):
    """``choose(call, backend)``, or the decision it gave last time for the same key (``op`` as in
    :func:`decision_key`)."""
    key = decision_key(call, backend, op)
    hit = DECISIONS.get(key)
    if hit is not None and tuning_table._cache.get(hit[1]) is hit[2]:
        return hit[0]
    choice = choose(call, backend)
    tables_key = f"{call.problem.device}|{tuning_table.cache_dir()}"
    tables = tuning_table._cache.get(tables_key)
    if tables is not None:  # lookup loaded the tables for this device: the decision is tied to them
        if len(DECISIONS) >= MAX_DECISIONS:
            DECISIONS.clear()
        DECISIONS[key] = (choice, tables_key, tables)
    return choice
