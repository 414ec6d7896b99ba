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
    cfg = chunk_fwd.default_config(torch.float32)
    assert cfg["intra_precision"] == "tf32x3" and cfg["solve_precision"] == "ieee" and cfg["solve_diag"] == "subst"
    assert cfg["dot_precision"] == "tf32x3"


@pytest.mark.parametrize("mode", ["high", "medium"])
def test_float32_inputs_use_tf32_when_pytorch_allows_it(restore_matmul_precision, mode):
    torch.set_float32_matmul_precision(mode)
    cfg = chunk_fwd.default_config(torch.float32)
    assert {cfg[k] for k in ("intra_precision", "solve_precision", "solve_diag", "dot_precision")} == {"tf32"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, None])
def test_half_inputs_keep_tf32_intermediates(restore_matmul_precision, dtype):
    torch.set_float32_matmul_precision("highest")
    cfg = chunk_fwd.default_config(dtype)
    assert cfg["intra_precision"] == "tf32" and cfg["dot_precision"] == "tf32"


def test_default_intra_stage_is_split3_and_the_space_holds_only_causal_organisations():
    from kda_compile.kernels_triton import chunk_intra
    cfg = chunk_fwd.default_config()
    assert cfg["intra_impl"] == "split3" and cfg["solve_diag"] == "tf32"
    space = chunk_fwd.get_configs(torch.bfloat16)
    assert {c["intra_impl"] for c in space} == set(chunk_intra.CAUSAL_IMPLS)
    assert set(chunk_intra.CAUSAL_IMPLS) <= set(chunk_intra.IMPLS)
    assert len(space) == len({tuple(sorted(c.items())) for c in space}), "duplicate configs in the search space"
    # every split3 knob of the space is varied somewhere
    varied = {key for c in space for key, value in c.items() if value != space[0].get(key)}
    assert {"solve_diag", "intra_a_warps", "intra_a_norms", "intra_a_row_BK", "intra_prep_BK"} <= varied


@pytest.mark.parametrize("bad, key", [({"intra_impl": "columns"}, "intra_impl"),
                                      ({"intra_impl": "split2", "intra_a_outputs": "late"}, "intra_a_outputs"),
                                      ({"intra_impl": "split2", "intra_norms": "solve"}, "intra_norms"),
                                      ({"intra_impl": "split3", "intra_a_norms": "late"}, "intra_a_norms"),
                                      ({"intra_impl": "split3", "solve_diag": "cholesky"}, "solve_diag")])
def test_unknown_intra_options_are_rejected_before_any_launch(bad, key):
    from kda_compile.api import _options
    from kda_compile.kernels_triton import chunk_intra
    T, H, K = 10, 1, 16
    q = torch.randn(T, H, K)
    opts = _options(q, None, False, False, False, False, None, 64, False)
    table = chunk_fwd.chunk_table(1, T, None, 64, "cpu")
    with pytest.raises(ValueError, match=key):
        chunk_intra.chunk_intra(q, q.clone(), q.clone(), -torch.rand(T, H, K), torch.rand(T, H), None, None, opts,
                                table, {**chunk_fwd.default_config(), **bad})
