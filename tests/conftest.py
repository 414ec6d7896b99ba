"""Shared pytest setup.

* Without CUDA, Triton's interpreter is turned on before anything imports Triton, so the Triton kernels run
  (slowly, at small sizes) on the CPU when a test names ``backend="triton"``; the default dispatch still uses
  the reference on CPU tensors.
* Tests marked ``gpu`` skip, with the reason, where CUDA is absent.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); runs on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
