"""bench/bench_model.py's training mode runs end to end on the CPU at tiny sizes (the GPU numbers come from the
same code): every model it can run gets a row, the FLA row is skipped with its reason where fla is missing, and
the KDA layers get our op back afterwards."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_training_mode_times_each_model_and_restores_the_op(tmp_path, capsys):
    import bench_model

    from kda_compile import api as kda_api
    original = kda_api.chunk_kda
    out = tmp_path / "train.md"
    assert bench_model.main(["--device", "cpu", "--tiny", "--train", "--seq-lens", "24", "--reps", "1",
                             "--out", str(out)]) == 0
    text = out.read_text()
    assert "| hybrid | 1 | 24 |" in text and "| full attention | 1 | 24 |" in text
    assert "T=24: hybrid / full attention:" in text
    if importlib.util.find_spec("fla") is None:
        assert "hybrid, FLA's KDA: skipped, fla not importable" in capsys.readouterr().out
    assert kda_api.chunk_kda is original


def test_fla_wrapper_maps_our_keywords(monkeypatch):
    """Our ``backend`` keyword is dropped and a lower bound turns on FLA's safe gate."""
    import types

    import bench_model
    seen = {}
    fake = types.ModuleType("fla.ops.kda")
    fake.chunk_kda = lambda *args, **kw: seen.update(kw) or "out"
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.kda", fake)
    call = bench_model.fla_chunk_kda()
    assert call(1, 2, 3, 4, 5, backend="triton", lower_bound=-5.0, chunk_size=64) == "out"
    assert seen == {"safe_gate": True, "lower_bound": -5.0, "chunk_size": 64}
    call(1, 2, 3, 4, 5, lower_bound=None)
    assert seen["safe_gate"] is False

