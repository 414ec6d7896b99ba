"""Checks shared by the backends' typed kernel configs (``kernels_triton/config.py``, ``kernels_tl/config.py``):
a config travels as a plain dict (tuned tables are JSON) and becomes a dataclass only through these, so an
unknown key or a bad value is a ``ValueError`` naming it before anything compiles or runs."""
from __future__ import annotations

import dataclasses


def config_from_dict(cls, values: dict, backend: str):
    """``cls(**values)`` for the dataclass ``cls``; unknown keys are a ValueError listing the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {backend} {cls.__name__} key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**values)


def op_config_checker(checks: dict):
    """A backend's ``check_config(op, config)`` from ``{op: parser}`` (each parser raises ValueError on a bad
    config): an op it has no parser for is a ValueError too."""
    def check_config(op: str, config: dict) -> None:
        if op not in checks:
            raise ValueError(f"op must be one of {list(checks)}, got {op!r}")
        checks[op](config)
    check_config.__doc__ = (f"Raise ValueError if ``config`` is not a valid config of ``op`` (one of {list(checks)}; "
                            "``chunk_bwd`` is the backward): unknown keys, bad values.")
    return check_config


def check_one_of(backend: str, name: str, value, allowed: tuple) -> None:
    """ValueError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{backend} config {name} must be one of {allowed}, got {value!r}")
