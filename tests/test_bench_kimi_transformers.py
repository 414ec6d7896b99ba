"""bench/bench_kimi_transformers.py at a tiny size on CPU: the table, the provider rows and the skips."""
import importlib.util
import os

import pytest

pytest.importorskip("transformers", reason="the benchmark needs the optional extra kda_compile[transformers]")

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_kimi_transformers.py")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_kimi_transformers", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_a_table_with_every_provider(capsys):
    bench = load_bench()
    if bench.transformers_kimi()[0] is None:
        pytest.skip("this transformers has no kimi_linear")
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--prompt", "40", "--decode", "2", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    for line in ("- device: cpu", "- versions: torch", "- date: ", "- command: `python", "| provider |"):
        assert line in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"pytorch", "fla", "kda_compile"}
    cells = [c.strip() for c in rows["kda_compile"].split("|")[1:-1]]
    assert float(cells[1].replace(",", "")) > 0 and float(cells[3]) < 1e-4     # tokens/s, prefill error
    assert float(cells[4]) < 1e-4                                               # decode error, same tokens
    try:
        import fla  # noqa: F401
    except ImportError:
        assert "skipped: ModuleNotFoundError" in rows["fla"]
    from kda_compile.integrations import transformers as integration
    assert not integration.is_enabled()                                         # restored afterwards


def test_a_transformers_without_kimi_linear_is_said_clearly(monkeypatch, capsys):
    bench = load_bench()
    monkeypatch.setattr(bench, "transformers_kimi", lambda: (None, "transformers 5.17.0 has no kimi_linear "
                                                                   "(KimiLinearForCausalLM)"))
    assert bench.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Nothing measured: transformers 5.17.0 has no kimi_linear" in out
    assert out.count("skipped: transformers 5.17.0") == 3
