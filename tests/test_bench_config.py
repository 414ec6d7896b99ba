"""bench/common.py, the benchmark scripts' shared runner: argument parsing, skipping providers, timing, the
perf_report sweep and its markdown table, and one tiny CPU run of the forward script (CPU only)."""
import math
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import common  # noqa: E402
from common import Skip, markdown_table, measure, parse_config, parse_ints, parse_shape, pick_device  # noqa: E402


def _has(*modules) -> bool:
    try:
        for m in modules:
            __import__(m)
    except ImportError:
        return False
    return True


def test_key_value_pairs_convert_integers_and_none():
    assert parse_config("state_BV=32,o_warps=4,name=tf32,cap=None") == {
        "state_BV": 32, "o_warps": 4, "name": "tf32", "cap": None}


def test_json_and_empty():
    assert parse_config('{"o_BK": 64, "solve_diag": "tf32"}') == {"o_BK": 64, "solve_diag": "tf32"}
    assert parse_config("") == {}


def test_item_without_equals_sign_is_an_error():
    with pytest.raises(ValueError, match="o_BK"):
        parse_config("o_BK")


def test_shapes_are_three_positive_integers():
    assert parse_shape("8,4096,32") == (8, 4096, 32)
    for bad in ("8,4096", "8,4096,x", "0,4096,32"):
        with pytest.raises(ValueError, match="B,T,H|positive"):
            parse_shape(bad)


def test_integer_lists():
    assert parse_ints("1024, 2048,4096", "--sweep-T") == [1024, 2048, 4096]
    for bad in ("", "1,x", "0,4"):
        with pytest.raises(ValueError, match="--sweep-T"):
            parse_ints(bad, "--sweep-T")


def test_device_choice():
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")


def test_gate_modes_give_the_keywords_and_inputs_of_each_mode():
    assert common.gate_kwargs("log") == {"use_qk_l2norm_in_kernel": True}
    assert common.gate_kwargs("safe")["lower_bound"] == common.LOWER_BOUND
    x = common.make_inputs(1, 8, 2, D=4, gate="log", device="cpu")
    assert x["q"].shape == (1, 8, 2, 4) and x["q"].dtype == torch.bfloat16 and (x["g"] < 0).all()
    assert "A_log" in common.make_inputs(1, 8, 2, D=4, gate="safe", device="cpu")
    with pytest.raises(ValueError, match="gate"):
        common.make_inputs(1, 8, 2, D=4, gate="nope", device="cpu")


def test_measure_times_on_cpu_and_skips_with_the_reason(capsys):
    calls = []
    assert measure("ok", lambda: (lambda: calls.append(1)), "cpu") >= 0
    assert len(calls) == 6  # one warm-up, five timed

    def missing():
        raise ImportError("No module named 'fla'")

    assert math.isnan(measure("peer-x", missing, "cpu"))
    assert math.isnan(measure("peer-y", lambda: (_ for _ in ()).throw(Skip("CUDA only")), "cpu"))
    assert math.isnan(measure("broken", lambda: (lambda: 1 / 0), "cpu"))
    err = capsys.readouterr().err
    assert "[skip] peer-x: ImportError: No module named 'fla'" in err
    assert "[skip] peer-y: Skip: CUDA only" in err
    assert "[fail] broken: ZeroDivisionError" in err


def test_markdown_table_and_ratio_columns():
    headers, rows = common.with_ratios(["T", "ours:triton (ms)", "fla (ms)"], [[64, 1.0, 2.0], [128, 3.0, float("nan")]],
                                       ["ours:triton", "fla"], "ms")
    assert headers[-1] == "triton / fla" and rows[0][-1] == 0.5 and math.isnan(rows[1][-1])
    text = markdown_table(headers, rows)
    assert text.splitlines()[2] == "| 64 | 1 | 2 | 0.5 |" and "—" in text.splitlines()[3]


def _sweep(tmp_path, capsys):
    def fn(T, provider, scale):
        return {"a": 1.0, "b": 2.0}[provider] * T * scale

    headers, rows = common.run_sweep(fn, x_names=["T"], x_vals=[16, 32], providers=["a", "b"], ylabel="ms",
                                     plot_name="demo", args={"scale": 0.5}, save_path=str(tmp_path), title="demo",
                                     device="cpu", out=str(tmp_path / "out.md"))
    return headers, rows, capsys.readouterr()


@pytest.mark.skipif(not _has("pandas", "matplotlib"), reason="perf_report needs pandas and matplotlib")
def test_sweep_writes_table_csv_and_plot(tmp_path, capsys):
    headers, rows, _ = _sweep(tmp_path, capsys)
    assert headers == ["T", "a (ms)", "b (ms)"] and rows == [[16, 8.0, 16.0], [32, 16.0, 32.0]]
    assert (tmp_path / "demo.png").stat().st_size > 0 and (tmp_path / "demo.csv").exists()
    md = (tmp_path / "out.md").read_text()
    assert "| 32 | 16 | 32 |" in md and "`python " in md and "CPU" in md


def test_sweep_without_pandas_still_measures_every_point(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import fails as if not installed
    headers, rows, out = _sweep(tmp_path, capsys)
    assert rows == [[16, 8.0, 16.0], [32, 16.0, 32.0]] and not (tmp_path / "demo.png").exists()
    assert "[no plot]" in out.err


@pytest.mark.skipif(not _has("pandas", "matplotlib"), reason="perf_report needs pandas and matplotlib")
def test_forward_script_runs_tiny_on_cpu(tmp_path, capsys):
    import bench_chunk

    assert bench_chunk.main(["--device", "cpu", "--gates", "log", "--backends", "reference",
                             "--providers", "ours,fla,sdpa", "--sweep-T", "16,32", "--plots", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| 32 |")]
    cells = table[0].split("|")
    assert float(cells[2]) > 0 and float(cells[4]) > 0  # reference and SDPA timed
    assert (tmp_path / "chunk_forward_log.png").exists()
    with pytest.raises(ValueError, match="--providers"):
        bench_chunk.main(["--device", "cpu", "--providers", "ours,flash"])


@pytest.mark.parametrize("args", [["--config", "tuned"], ["--training", "l2_safe"]], ids=["forward", "training"])
def test_breakdown_script_runs_on_the_cpu(args, tmp_path, capsys):
    """bench_breakdown.py at a tiny size on the CPU: the forward table, and with --training the forward + backward
    table (the reference backend's operators)."""
    import bench_breakdown
    out = tmp_path / "results.md"
    assert bench_breakdown.main(["--device", "cpu", "--shapes", "1,64,2", "--no-peers", "--backends", "reference",
                                 "--calls", "1", "--out", str(out), *args]) == 0
    text = out.read_text()
    assert ("forward + backward" in text) == ("--training" in args)
    assert "ours:reference" in text and "**total**" in text


def test_a_training_bench_stopped_by_timeout_writes_the_rows_it_measured(tmp_path):
    """SIGTERM (what `timeout` sends) mid-run: the rows measured so far reach --out, titled as a stopped run."""
    import signal
    import subprocess
    out = tmp_path / "results.md"
    cmd = [sys.executable, os.path.join(BENCH, "bench_chunk_bwd.py"), "--device", "cpu", "--settings", "prenorm_log",
           "--providers", "ours", "--backends", "reference", "--out", str(out), "--shapes", *["1,64,2"] * 200]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("[row]"):
                proc.send_signal(signal.SIGTERM)
                break
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    text = out.read_text()
    assert "(stopped after" in text and "of 200 shapes)" in text and "| 1 | 64 | 2 |" in text
