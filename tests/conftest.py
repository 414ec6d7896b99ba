"""Shared pytest setup.

* Without CUDA, Triton's interpreter is turned on before anything imports Triton, so the Triton kernels run
  (slowly, at small sizes) on the CPU when a test names ``backend="triton"``; the default dispatch still uses
  the reference on CPU tensors.
* Tests marked ``gpu`` skip, with the reason, where CUDA is absent.
* ``KDA_CHECK_TRITON_BOUNDS=1``: every interpreted Triton kernel of the session (and of the Triton backward's
  worker processes) checks each load and store against its tensor arguments (tests/triton_bounds.py); slower,
  for a sweep of the whole suite.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    if os.environ.get("KDA_CHECK_TRITON_BOUNDS") == "1" and os.environ.get("TRITON_INTERPRET") == "1":
        from triton_bounds import checked_accesses
        config._kda_bounds = checked_accesses()
        config._kda_bounds.__enter__()


def pytest_unconfigure(config):
    bounds = getattr(config, "_kda_bounds", None)
    if bounds is not None:
        bounds.__exit__(None, None, None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); runs on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
