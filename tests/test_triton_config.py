"""The Triton backend's default config: float32 inputs follow torch.set_float32_matmul_precision."""
import pytest
import torch

from kda_compile.kernels_triton import chunk_fwd


@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_float32_inputs_get_float32_accurate_products_by_default(restore_matmul_precision):
    torch.set_float32_matmul_precision("highest")
    cfg = chunk_fwd.default_config(2, 4, 64, torch.float32)
    assert cfg["intra_precision"] == "tf32x3" and cfg["solve_precision"] == "ieee"
    assert cfg["dot_precision"] == "tf32x3"


@pytest.mark.parametrize("mode", ["high", "medium"])
def test_float32_inputs_use_tf32_when_pytorch_allows_it(restore_matmul_precision, mode):
    torch.set_float32_matmul_precision(mode)
    cfg = chunk_fwd.default_config(2, 4, 64, torch.float32)
    assert {cfg[k] for k in ("intra_precision", "solve_precision", "dot_precision")} == {"tf32"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, None])
def test_half_inputs_keep_tf32_intermediates(restore_matmul_precision, dtype):
    torch.set_float32_matmul_precision("highest")
    cfg = chunk_fwd.default_config(2, 4, 64, dtype)
    assert cfg["intra_precision"] == "tf32" and cfg["dot_precision"] == "tf32"
