"""PyTorch's float32 matmul precision as the kernels need it: may float32 products on the GPU use TF32?

PyTorch has two ways to set it: the legacy ``torch.set_float32_matmul_precision`` ("highest", the default, or
"high"/"medium") and the newer ``torch.backends.fp32_precision`` / ``torch.backends.cuda.matmul.fp32_precision``
("ieee" or "tf32"; "none" inherits).  Once the newer one is used, ``torch.get_float32_matmul_precision()`` raises,
so the answer is read from ``torch.backends.cuda.matmul.fp32_precision``, which both ways set (the inherited value
resolved) and which never raises.
"""
from __future__ import annotations

import torch


def float32_allows_tf32() -> bool:
    """True when float32 matmuls on the GPU may use TF32 ("high"/"medium", or fp32_precision "tf32"); False for
    float32-accurate products ("highest", PyTorch's default, or "ieee")."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is None:  # a PyTorch without the newer API
        return torch.get_float32_matmul_precision() != "highest"
    return precision == "tf32"
