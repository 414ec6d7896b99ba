"""Autotune and the tuned table on CPU: checking before timing, persistence, corruption, concurrency,
precedence in dispatch, resume, and the command line."""
import json
import multiprocessing
import time
import warnings

import pytest
import torch

from kda_compile import autotune, dispatch, explain, tuning_table
from kda_compile.buckets import Bucket, TuneShape, bucket_of
from kda_compile.reference_backend import run_reference

from kda_inputs import make_inputs

# the bucket of small_call_args() on the CPU: log gate, no prologue in the kernel, 1 sequence x 1 head
SHAPE = TuneShape(Bucket("chunk", "fp32", 8, 8, "T1k", "dense", "log", "none", "p1"), N=1, T=70, H=1, HV=1)
CONFIGS = [{"mode": "slow"}, {"mode": "wrong"}, {"mode": "crash"}, {"mode": "fast"}]


class FakeBackend:
    """A backend whose configs are: slow but right, wrong, crashing, fast and right."""

    def __init__(self):
        self.calls = []

    def run(self, call, config):
        self.calls.append((config["mode"], call.problem.T))
        if config["mode"] == "crash":
            raise RuntimeError("boom")
        o, s = run_reference(call, {})
        if config["mode"] == "wrong":
            return o * 1.01, s
        if config["mode"] == "slow":
            time.sleep(0.2)  # far slower than any timing noise
        return o, s

    def backend(self):
        return dispatch.Backend(name="fake", supports=lambda call: None if call.op == "chunk" else "chunk only",
                                run=self.run, configs=lambda call: list(CONFIGS),
                                default_config=lambda call: {"mode": "slow"})


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("KDA_COMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KDA_COMPILE_BACKEND", raising=False)
    tuning_table.invalidate()
    backend = FakeBackend()
    dispatch.register_backend(backend.backend())
    yield backend
    dispatch.unregister_backend("fake")
    tuning_table.invalidate()


def small_call_args():
    args = make_inputs(B=1, T=70, H=1, K=8, V=8, dtype=torch.float32)
    return [args.pop(n) for n in ("q", "k", "v", "g", "beta")], args


def test_wrong_and_crashing_configs_are_rejected_and_never_timed(fake):
    found = autotune.tune([SHAPE], "cpu", backends=["fake"], log=lambda *a: None)
    record = found[SHAPE.bucket.key]
    assert record["backend"] == "fake" and record["done"]
    assert record["config"] == {"mode": "fast"} and record["per_backend"]["fake"]["config"] == {"mode": "fast"}
    assert record["default"]["config"] == {"mode": "slow"} and record["default"]["time_ms"] > record["time_ms"]
    rejected = " ".join(f"{k}: {v}" for k, v in record["rejected"].items())
    assert "'wrong'" in rejected and "relative error" in rejected
    assert "'crash'" in rejected and "crashed: RuntimeError: boom" in rejected
    timed_modes = {mode for mode, T in fake.calls if T == SHAPE.T}
    assert "wrong" not in timed_modes and "crash" not in timed_modes
    assert {"slow", "fast"} <= timed_modes


def test_dispatch_reads_the_tuned_table(fake):
    (q, k, v, g, beta), rest = small_call_args()
    before = explain(q, k, v, g, beta, **rest)
    assert before.backend.name == "fake" and "no tuned table entry" in before.reason
    record = {"backend": "reference", "config": {}, "time_ms": 1.0, "bucket": SHAPE.bucket.key,
              "per_backend": {"fake": {"config": {"mode": "fast"}, "time_ms": 2.0}}}
    tuning_table.write_entries({SHAPE.bucket.key: record}, tuning_table.machine_identity("cpu"))
    choice = explain(q, k, v, g, beta, **rest)
    assert choice.backend.name == "reference" and "tuned table" in choice.reason
    forced = explain(q, k, v, g, beta, backend="fake", **rest)
    assert forced.config == {"mode": "fast"}  # a forced backend still gets its tuned config


def test_shipped_table_is_below_the_user_table(fake, monkeypatch):
    (q, k, v, g, beta), rest = small_call_args()
    shipped = {SHAPE.bucket.key: {"backend": "reference", "config": {}, "time_ms": 3.0}}
    monkeypatch.setattr(tuning_table, "load_shipped_table", lambda identity=None: (shipped, "test.json"))
    tuning_table.invalidate()
    assert "shipped table test.json" in explain(q, k, v, g, beta, **rest).reason
    tuning_table.write_entries({SHAPE.bucket.key: {"backend": "fake", "config": {"mode": "fast"}, "time_ms": 1.0}},
                               tuning_table.machine_identity("cpu"))
    choice = explain(q, k, v, g, beta, **rest)
    assert choice.backend.name == "fake" and "tuned table" in choice.reason and choice.config == {"mode": "fast"}


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 99, "entries": {}}), json.dumps([1, 2])])
def test_corrupted_table_warns_once_and_falls_back(fake, content):
    path = tuning_table.table_path(tuning_table.machine_identity("cpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    tuning_table._warned.clear()
    (q, k, v, g, beta), rest = small_call_args()
    with pytest.warns(RuntimeWarning, match="corrupted"):
        choice = explain(q, k, v, g, beta, **rest)
    assert choice.backend.name == "fake" and "default order" in choice.reason
    tuning_table.invalidate()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second read stays quiet
        explain(q, k, v, g, beta, **rest)


def test_table_from_other_versions_is_ignored(fake):
    identity = dict(tuning_table.machine_identity("cpu"), torch="0.0.1")
    path = tuning_table.table_path(identity)
    tuning_table.write_entries({SHAPE.bucket.key: {"backend": "reference", "config": {}}}, identity, path)
    tuning_table._warned.clear()
    (q, k, v, g, beta), rest = small_call_args()
    with pytest.warns(RuntimeWarning, match="measured with"):
        assert explain(q, k, v, g, beta, **rest).backend.name == "fake"


def _writer(cache_dir, worker, count):
    import os
    os.environ["KDA_COMPILE_CACHE_DIR"] = cache_dir
    from kda_compile import tuning_table as table
    identity = table.machine_identity("cpu")
    for i in range(count):
        table.write_entries({f"chunk/fp32/K8V8/T1k/w{worker}-{i}": {"backend": "reference", "config": {}}}, identity)


def test_concurrent_writers_do_not_corrupt_the_table(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 15)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    files = list((tmp_path / "tuned").glob("*.json"))
    assert len(files) == 1
    entries = json.loads(files[0].read_text())["entries"]
    assert len(entries) == 45  # every write of every process survived the merge
    assert not list((tmp_path / "tuned").glob("*.tmp"))


def test_the_record_and_the_summary_say_where_the_tuning_time_went(fake):
    lines = []
    record = autotune.tune([SHAPE], "cpu", backends=["fake"], log=lines.append)[SHAPE.bucket.key]
    # the slow default sleeps 0.2 s in each of its calls (checked once, timed several times)
    assert set(record["seconds"]) == {"fake"} and record["seconds"]["fake"] >= 0.4
    assert any(f"fake {record['seconds']['fake']:.0f} s" in line and "tuning took" in line for line in lines)
    saved = tuning_table._read(tuning_table.table_path(tuning_table.machine_identity("cpu")))
    assert saved["entries"][SHAPE.bucket.key]["seconds"] == record["seconds"]


def test_resume_skips_finished_buckets_and_budget_stops_early(fake):
    other = TuneShape(Bucket("chunk", "fp32", 8, 8, "T8k", "dense", "log", "none", "p1"), N=1, T=70, H=1, HV=1)
    lines = []
    assert autotune.tune([SHAPE, other], "cpu", backends=["fake"], budget_s=0.0, log=lines.append) == {}
    assert not tuning_table.table_path(tuning_table.machine_identity("cpu")).exists()
    assert any("time budget" in line for line in lines)
    first = autotune.tune([SHAPE], "cpu", backends=["fake"], log=lines.append)
    assert SHAPE.bucket.key in first
    fake.calls.clear()
    second = autotune.tune([SHAPE, other], "cpu", backends=["fake"], log=lines.append)
    assert list(second) == [other.bucket.key]
    assert any(line.startswith(f"skip {SHAPE.bucket.key}") for line in lines)


def test_bucket_keys_round_trip_and_classify_calls():
    for key in ("chunk/bf16/K128V128/T8k/dense/safe/l2n+bsig/p0", "recurrent/fp16/K64V64/t1/varlen/log/none/any"):
        assert Bucket.parse(key).key == key
    # a key of the older 5-part form reads as the bucket it was measured in
    assert Bucket.parse("chunk/bf16/K128V128/T8k/dense").key == "chunk/bf16/K128V128/T8k/dense/log/l2n/any"
    for bad in ("chunk/bf16/128/T8k", "chunk/bf16/K8V8/T8k/dense/soft/l2n/p0", "chunk/bf16/K8V8/T8k/dense/log/x/p0"):
        with pytest.raises(ValueError, match="bucket key"):
            Bucket.parse(bad)
    call = autotune.make_call(SHAPE.bucket, 1, 5000, 1, 1, "cpu", 0)
    assert bucket_of(call).key == "chunk/fp32/K8V8/T8k/dense/log/none/p1"


def test_command_line(fake, capsys):
    with pytest.raises(SystemExit) as info:
        autotune.main(["--help"])
    assert info.value.code == 0 and "float64 reference" in capsys.readouterr().out
    assert autotune.main(["--device", "cpu", "--list", "--dtypes", "fp32", "--dims", "8"]) == 0
    assert "chunk/fp32/K8V8/T1k/dense/log/l2n/p1" in capsys.readouterr().out
    assert autotune.main(["--device", "cpu", "--bucket", SHAPE.bucket.key, "--backends", "fake",
                          "--max-configs", "1"]) == 0
    out = capsys.readouterr().out
    assert "gains over the default config" in out
    assert autotune.main(["--device", "cpu", "--explain", "--dtypes", "fp32", "--dims", "8", "--ops", "chunk"]) == 0
    out = capsys.readouterr().out
    assert "tuned table" in out and "backend 'fake'" in out
    with pytest.raises(SystemExit):
        autotune.main(["--gates", "soft", "--device", "cpu"])
    with pytest.raises(SystemExit):
        autotune.main(["--dtypes", "int8", "--device", "cpu"])


def test_shipped_h100_table_is_found_for_an_h100():
    """The table measured on the device ships in the package and matches the H100 by name and capability."""
    identity = {"device": "NVIDIA H100 80GB HBM3", "capability": "9.0", "torch": "9.9", "triton": "9.9",
                "tilelang": "9.9"}
    entries, name = tuning_table.load_shipped_table(identity)
    assert name == "h100.json"
    for key, record in entries.items():
        assert Bucket.parse(key).key == key
        assert record["backend"] in ("tilelang", "triton", "reference") and "time_ms" in record
    assert tuning_table.load_shipped_table(dict(identity, device="NVIDIA A100"))[1] is None


def test_unsupported_backends_are_skipped_not_rejected(fake, capsys):
    """The fake backend runs chunk calls only: on a decode bucket it is skipped with its reason, reported
    apart from the rejected (wrong or crashing) configs, and the progress says so."""
    decode = TuneShape(Bucket("recurrent", "fp32", 8, 8, "t1", "dense", "log", "none", "p1"), N=2, T=1, H=1, HV=1)
    found = autotune.tune([decode], "cpu", backends=["fake", "reference"], log=print)
    record = found[decode.bucket.key]
    assert record["backend"] == "reference"
    assert record["skipped"] == {"fake": "chunk only"}
    assert not any(key.startswith("fake") for key in record["rejected"])
    assert record["rejected"] == {}
    captured = capsys.readouterr()
    assert f"{decode.bucket.key} fake: skipped: chunk only" in captured.err


def test_progress_lines_on_a_non_terminal(fake, capsys):
    """Not a terminal: tqdm's meter, one line per config, with bucket, backend, config n/N and the result,
    and no carriage returns."""
    autotune.tune([SHAPE], "cpu", backends=["fake"], log=lambda *a: None)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == len(CONFIGS)
    for n, line in enumerate(lines, 1):
        assert f"| {n}/{len(CONFIGS)} [" in line and f"{SHAPE.bucket.key} fake config {n}: " in line
    assert "rejected (output relative error" in lines[1] and "crashed" in lines[2] and lines[3].endswith("ms]")


def test_progress_bar_on_a_terminal():
    """A terminal gets a tqdm bar updated in place, whose postfix is the last step."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    step, close = autotune.progress(2, stream)
    step("chunk/bf16 triton config 1/2: 1.000 ms")
    step("chunk/bf16 triton config 2/2: 2.000 ms")
    close()
    text = stream.getvalue()
    assert "\r" in text and "2/2" in text and "config 2/2: 2.000 ms" in text
