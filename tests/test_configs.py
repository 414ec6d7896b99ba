"""The backends' typed kernel configs: defaults in one place, unknown keys and bad values rejected before any
launch, search spaces made of valid configs, shipped tables valid in this version, float32 precision rules."""
from __future__ import annotations

import importlib.util
import json
from importlib import resources

import pytest
import torch

from kda_compile import dispatch



def _backend(name):
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed")
    return dispatch.get_backend(name)


@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("name", ["triton", "tilelang"])
@pytest.mark.parametrize("op, bad, needle", [("chunk", {"intra_impl": "split3"}, "unknown"),
                                             ("recurrent", {"rec_BV": 16}, "unknown"),
                                             ("chunk", {"state_BV": 24}, "state_BV")])
def test_unknown_keys_and_bad_values_are_errors(name, op, bad, needle):
    backend = _backend(name)
    with pytest.raises(ValueError, match=needle):
        backend.check_config(op, bad)


@pytest.mark.parametrize("name", ["triton", "tilelang"])
@pytest.mark.parametrize("op", ["chunk", "recurrent"])
def test_search_space_is_valid_and_starts_from_the_default(name, op):
    from kda_compile.autotune import make_call
    from kda_compile.buckets import Bucket
    backend = _backend(name)
    call = make_call(Bucket(op, "bf16", 32, 32, "T1k" if op == "chunk" else "t1", "dense"), 2, 8 if op == "chunk" else 1,
                     1, 1, "cpu", 0)
    space = backend.configs(call)
    assert len(space) > 1
    assert len(space) == len({json.dumps(c, sort_keys=True) for c in space}), "duplicate configs"
    for config in space + [backend.default_config(call)]:
        backend.check_config(op, config)


def test_shipped_tables_hold_only_valid_configs():
    folder = resources.files("kda_compile") / "tables"
    for entry in folder.iterdir():
        if not entry.name.endswith(".json"):
            continue
        table = json.loads(entry.read_text())
        for key, record in table["entries"].items():
            op = key.split("/")[0]
            for name, best in {record["backend"]: record, **record.get("per_backend", {})}.items():
                if importlib.util.find_spec(name if name != "reference" else "torch") is None:
                    continue
                assert dispatch.config_error(dispatch.get_backend(name), op, best["config"]) is None, (entry.name, key)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_float32_products_follow_pytorch_precision(restore_matmul_precision):
    from kda_compile.kernels_triton.config import chunk_config
    torch.set_float32_matmul_precision("highest")
    cfg = chunk_config({}, torch.float32)
    assert (cfg.precision, cfg.solve_precision, cfg.solve_diag) == ("tf32x3", "ieee", "subst")
    torch.set_float32_matmul_precision("high")
    assert chunk_config({}, torch.float32).precision == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert chunk_config({}, torch.bfloat16).precision == "tf32"     # half inputs keep TF32 intermediates
    assert chunk_config({"precision": "ieee"}, torch.float32).precision == "ieee"   # an explicit choice wins
    before = torch.backends.cuda.matmul.fp32_precision
    try:  # the newer API, after which torch.get_float32_matmul_precision() raises
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert chunk_config({}, torch.float32).precision == "tf32"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert chunk_config({}, torch.float32).precision == "tf32x3"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_backward_refuses_float32_accurate_products_on_a_gpu_before_any_kernel():
    """A config naming "tf32x3" or "ieee" products for the Triton backward is an error on a GPU (its solve kernel
    faults with them), and fine in the interpreter."""
    from kda_compile.kernels_triton.chunk_bwd import check_products
    from kda_compile.kernels_triton.config import backward_config
    for asked in ({"precision": "tf32x3"}, {"solve_precision": "ieee"}):
        with pytest.raises(ValueError, match="precision and solve_precision 'tf32' only"):
            check_products(backward_config(asked, torch.bfloat16), torch.device("cuda"))
        check_products(backward_config(asked, torch.bfloat16), torch.device("cpu"))
    check_products(backward_config({}, torch.bfloat16), torch.device("cuda"))


def test_default_order_is_explicit_not_import_order():
    """Importing a kernel package first does not move it ahead in the default order."""
    import importlib
    for module in dispatch.PLUGIN_MODULES.values():
        try:
            importlib.import_module(module)
        except Exception:
            pass
    order = dispatch.backends()
    ranks = [dispatch.DEFAULT_ORDER.index(name) for name in order if name in dispatch.DEFAULT_ORDER]
    assert ranks == sorted(ranks) and order[-1] == "reference"


def test_an_invalid_tuned_config_is_ignored_with_the_reason(monkeypatch):
    """A table entry written by another version (e.g. with a removed key) is not run; explain says why."""
    from kda_compile import explain, tuning_table
    from kda_inputs import make_inputs
    backend = dispatch.Backend(name="fake_cfg", supports=lambda call: None, run=lambda call, config: None,
                               check_config=lambda op, config: (_ for _ in ()).throw(ValueError("bad key 'x'"))
                               if "x" in config else None)
    dispatch.register_backend(backend, before="reference")
    try:
        monkeypatch.setattr(tuning_table, "lookup", lambda call: ({"backend": "fake_cfg", "config": {"x": 1}},
                                                                  "tuned table test"))
        a = make_inputs(B=1, T=5, H=1, K=16, V=16, dtype=torch.float32)
        choice = explain(**a)
        assert choice.config == {} and any("not valid" in why for why in choice.rejected.values())
    finally:
        dispatch.unregister_backend("fake_cfg")
