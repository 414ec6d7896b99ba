"""Autotuning and dispatch of the chunkwise backward (bucket op ``chunk_bwd``) on CPU: bucket keys and default
shapes, the backends' backward search spaces, configs checked against the float64 reference backward and timed as
the backward alone, the table entry the dispatch then reads (explain says where the config came from), invalid
entries skipped with the reason, and the sequence class fixing the bit-changing knobs.  The real Triton backward
runs through Triton's interpreter at tiny sizes."""
import dataclasses
import importlib.util
import os
import time

import pytest
import torch

from kda_compile import autotune, buckets, dispatch, explain, tuning_table
from kda_compile.autotune_search import stages
from kda_compile.buckets import BACKWARD_OP, Bucket, TuneShape, bucket_of
from kda_compile.reference_backend import run_reference, run_reference_backward

from kda_inputs import make_inputs

# a single fp32 sequence of 40 tokens, K = V = 16, log gate, no prologue in the kernel: parallelism p1 on the CPU
SHAPE = TuneShape(Bucket(BACKWARD_OP, "fp32", 16, 16, "T1k", "dense", "log", "none", "p1"), N=1, T=40, H=1, HV=1)


def args_of(shape: TuneShape, **extra) -> dict:
    """explain() arguments of a call in ``shape``'s bucket."""
    return make_inputs(B=shape.N, T=shape.T, H=shape.H, K=shape.bucket.K, V=shape.bucket.V, dtype=torch.float32,
                       seed=0, **extra)


def explain_backward(shape: TuneShape, **kwargs) -> dispatch.Choice:
    return explain(**args_of(shape), op="chunk_backward", **kwargs)


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KDA_COMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KDA_COMPILE_BACKEND", raising=False)
    tuning_table.invalidate()
    yield tmp_path
    tuning_table.invalidate()


@pytest.fixture
def triton_on_cpu(table_dir):
    """The real Triton backend, in the default order for CPU tensors too (its interpreter runs the kernels)."""
    if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs Triton's kernels through its interpreter, which conftest turns on only without a GPU")
    real = dispatch.get_backend("triton")
    dispatch.register_backend(dataclasses.replace(real, supports=real.supports_forced))
    yield real
    dispatch.register_backend(real)


def write_entry(shape: TuneShape, record: dict) -> None:
    tuning_table.write_entries({shape.bucket.key: dict(record, bucket=shape.bucket.key)},
                               tuning_table.machine_identity("cpu"))


# ------------------------------------------------------------------------------------------ buckets

def test_backward_bucket_keys_and_classification():
    key = "chunk_bwd/bf16/K128V128/T8k/varlen/safe/l2n/p4"
    assert Bucket.parse(key).key == key
    assert Bucket.parse(key).sequence_key == "chunk_bwd/bf16/K128V128/safe/l2n"   # not the forward's class
    with pytest.raises(ValueError, match="op must be one of"):
        Bucket.parse("chunk_backward/bf16/K128V128/T8k/dense/log/l2n/p1")
    call = autotune.make_call(SHAPE.bucket, 1, 5000, 1, 1, "cpu", 0)
    assert call.op == "chunk"                                  # measured on chunk calls
    assert bucket_of(call, op=BACKWARD_OP).key == "chunk_bwd/fp32/K16V16/T8k/dense/log/none/p1"
    assert bucket_of(call).key == "chunk/fp32/K16V16/T8k/dense/log/none/p1"
    with pytest.raises(ValueError, match="not measured on"):
        bucket_of(autotune.make_call(Bucket("recurrent", "fp32", 16, 16, "t1", "dense"), 1, 1, 1, 1, "cpu", 0),
                  op=BACKWARD_OP)


def test_default_shapes_put_the_backward_after_every_forward_bucket(monkeypatch):
    """The forward's most used classes first, the rest of the forward, and last the backward (its TileLang
    candidates compile longest): a budget-limited run covers the forward."""
    monkeypatch.setattr(buckets, "sm_count", lambda device: 132)
    shapes = buckets.default_tune_shapes("cuda", dtypes=("bf16",), dims=(128,))
    kinds = [f"{s.bucket.op}/{s.bucket.length}/{s.bucket.layout}" for s in shapes]
    assert kinds[-2:] == ["chunk_bwd/T8k/dense"] * 2 and kinds.count("chunk_bwd/T8k/dense") == 2
    assert kinds[:8] == ["chunk/T8k/dense"] * 2 + ["recurrent/t1/dense"] * 2 + ["chunk/Tlong/dense"] * 2 + \
        ["chunk/Tlong/varlen"] * 2
    assert len(kinds) > 10                                     # the rest of the forward in between
    backward = [s for s in shapes if s.bucket.op == BACKWARD_OP]
    assert {(s.N, s.T, s.H) for s in backward} == {(2, 8192, 16)}
    assert {s.bucket.gate for s in backward} == {"log", "safe"}
    assert not any(s.bucket.op == BACKWARD_OP
                   for s in buckets.default_tune_shapes("cuda", ops=("chunk", "recurrent")))
    cpu = buckets.default_tune_shapes("cpu", dtypes=("fp32",), dims=(16,), gates=("log",))
    assert sorted(s.bucket.op for s in cpu) == sorted(["chunk", "recurrent", BACKWARD_OP])
    assert all(s.T <= 100 for s in cpu)                        # tiny: the CPU run checks the machinery


def test_command_line_accepts_the_backward_op(table_dir, capsys):
    assert autotune.main(["--device", "cpu", "--list", "--dtypes", "fp32", "--dims", "16"]) == 0
    assert "chunk_bwd/fp32/K16V16/T1k/dense/log/l2n/p1" in capsys.readouterr().out     # in the default ops
    with pytest.raises(SystemExit):
        autotune.main(["--device", "cpu", "--ops", "chunk_backward", "--list"])
    assert "chunk_bwd" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ search spaces

@pytest.mark.parametrize("name", ["triton", "tilelang"])
def test_backward_search_space_is_valid_and_holds_no_forward_only_knob(name):
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed")
    backend = dispatch.get_backend(name)
    call = autotune.make_call(SHAPE.bucket, 1, 40, 1, 1, "cpu", 0)
    space = backend.backward_configs(call)
    default = backend.backward_default_config(call)
    assert len(space) > 10
    assert len(space) == len({tuple(sorted(c.items())) for c in space}), "duplicate configs"
    for config in space + [default]:
        backend.check_config(BACKWARD_OP, config)
    knobs = {key for config in space for key in config}
    assert not any(key.startswith(("o_", "decode_", "segment_len", "layout")) for key in knobs), knobs
    assert {key for key in knobs if key.startswith("bwd_")}
    with pytest.raises(ValueError, match="unknown"):
        backend.check_config(BACKWARD_OP, {"bwd_nonsense": 1})
    with pytest.raises(ValueError, match="op must be one of"):
        backend.check_config("chunk backward", {})
    moves = sum(len(stage) for stage in stages(space))
    assert moves <= 45, moves                                  # searched stage by stage, never the product


def test_triton_backward_space_holds_the_recompute_knobs():
    """The recompute runs the forward's intra and state stages: their knobs are searched, the output stage's not."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from kda_compile.kernels_triton.chunk_bwd import get_configs
    knobs = {key for config in get_configs() for key in config}
    assert {"intra_BK", "solve_diag", "state_BV", "bwd_intra_BK", "bwd_state_warps"} <= knobs
    assert buckets.is_bit_changing("triton", "solve_diag") and buckets.is_bit_changing("triton", "bwd_intra_BK")
    assert not buckets.is_bit_changing("triton", "bwd_state_warps")


# ------------------------------------------------------------------------ checking and timing, fake

class FakeBackward:
    """A backend whose backward configs are: slow but right (the default), wrong, crashing, fast and right."""

    def __init__(self, default="slow", space=("slow", "wrong", "crash", "fast")):
        self.default, self.space = default, space

    def run_backward(self, call, config, do, dht):
        if config["mode"] == "crash":
            raise RuntimeError("boom")
        grads = run_reference_backward(call, {}, do, dht)
        if config["mode"] == "wrong":
            return (grads[0] * 1.05,) + grads[1:]
        if config["mode"] == "slow":
            time.sleep(0.2)  # far slower than any timing noise
        return grads

    def backend(self):
        return dispatch.Backend(name="fake_bwd", supports=lambda call: None, run=run_reference,
                                run_backward=self.run_backward,
                                backward_default_config=lambda call: {"mode": self.default},
                                backward_configs=lambda call: [{"mode": mode} for mode in self.space])


@pytest.fixture
def fake_bwd(table_dir):
    dispatch.register_backend(FakeBackward().backend(), before="reference")
    yield
    dispatch.unregister_backend("fake_bwd")


def test_wrong_and_crashing_backward_configs_are_rejected_and_never_timed(fake_bwd, monkeypatch):
    timed = []
    real = autotune.time_backward_config

    def spy(backend, config, call, do, dht):
        timed.append((config["mode"], call.problem.T, tuple(do.shape), tuple(dht.shape)))
        return real(backend, config, call, do, dht)

    monkeypatch.setattr(autotune, "time_backward_config", spy)
    record = autotune.tune([SHAPE], "cpu", backends=["fake_bwd"], log=lambda *a: None)[SHAPE.bucket.key]
    assert record["backend"] == "fake_bwd" and record["config"] == {"mode": "fast"} and record["done"]
    assert record["default"]["config"] == {"mode": "slow"} and record["default"]["time_ms"] > record["time_ms"]
    rejected = " ".join(f"{k}: {v}" for k, v in record["rejected"].items())
    assert "'wrong'" in rejected and "dq relative error" in rejected
    assert "'crash'" in rejected and "crashed: RuntimeError: boom" in rejected
    assert {mode for mode, *_ in timed} == {"slow", "fast"}    # only correct configs are timed
    assert {(T, do, dht) for _, T, do, dht in timed} == {(40, (1, 40, 1, 16), (1, 1, 16, 16))}


def test_a_backward_whose_default_is_wrong_is_unfit_for_the_backward_only(fake_bwd):
    dispatch.register_backend(FakeBackward(default="wrong", space=("fast",)).backend(), before="reference")
    record = autotune.tune([SHAPE], "cpu", backends=["fake_bwd", "reference"], log=lambda *a: None)[SHAPE.bucket.key]
    assert "fake_bwd" in record["unfit"] and record["backend"] == "reference"
    other = TuneShape(dataclasses.replace(SHAPE.bucket, flags="l2n"), 1, 40, 1, 1)  # another class, no entry
    choice = explain_backward(other, use_qk_l2norm_in_kernel=True)
    assert choice.backend.name == "reference" and "misses the fp32 tolerance" in choice.rejected["fake_bwd"]
    assert explain(**args_of(other), use_qk_l2norm_in_kernel=True).backend.name == "fake_bwd"   # forward: fine


def test_backward_tolerances_are_the_backward_tests():
    import test_triton_bwd
    for name, dtype in (("fp16", "float16"), ("bf16", "bfloat16")):
        assert autotune.BACKWARD_TOLERANCE[name] == test_triton_bwd.TOL[dtype]
    assert autotune.BACKWARD_TOLERANCE["fp32"] >= test_triton_bwd.TOL["float32"]   # TF32 products on a GPU


def test_cpu_run_of_the_default_buckets_covers_the_backward(table_dir, capsys):
    """The machinery end to end on the CPU: the tiny default backward bucket is tuned (reference backend) and
    --explain shows the backward's choice coming from the table."""
    assert autotune.main(["--device", "cpu", "--ops", BACKWARD_OP, "--dtypes", "fp32", "--dims", "16",
                          "--gates", "log"]) == 0
    out = capsys.readouterr().out
    key = "chunk_bwd/fp32/K16V16/T1k/dense/log/l2n/p1"
    assert f"{key}: default reference" in out
    assert autotune.main(["--device", "cpu", "--explain", "--ops", BACKWARD_OP, "--dtypes", "fp32", "--dims", "16",
                          "--gates", "log"]) == 0
    out = capsys.readouterr().out
    assert "kda_compile chunk backward: backend 'reference' (tuned table" in out and f"bucket {key}" in out


# ------------------------------------------------------------------------- the real Triton backward

def test_tuned_triton_backward_entry_is_what_the_dispatch_runs(triton_on_cpu):
    from kda_compile import chunk_kda
    found = autotune.tune([SHAPE], "cpu", backends=["triton"], max_configs=2, log=lambda *a: None)
    record = found[SHAPE.bucket.key]
    assert record["backend"] == "triton" and record["time_ms"] > 0 and record["done"]
    assert record["default"]["config"] == {} and record["default"]["time_ms"] > 0
    assert len(record["timed"]) == 2 and record["rejected"] == {}
    path = tuning_table.table_path(tuning_table.machine_identity("cpu"))
    assert SHAPE.bucket.key in tuning_table._read(path)["entries"]

    choice = explain_backward(SHAPE)
    assert choice.backend.name == "triton" and choice.config == record["config"]
    assert f"tuned table {path}, bucket {SHAPE.bucket.key}" in choice.reason
    forced = explain_backward(SHAPE, backend="triton")
    assert forced.config == record["config"] and f"tuned config of bucket {SHAPE.bucket.key}" in forced.reason
    other = explain_backward(SHAPE, backend="reference")
    assert other.config == {} and "default config (the tuned entry is for triton)" in other.reason
    forward = explain(**args_of(SHAPE))
    assert "no tuned table entry" in forward.reason            # a backward entry is not the forward's

    used = []
    real_run = dispatch.get_backend("triton").run_backward

    def spy(call, config, do, dht, **kept):
        used.append(dict(config))
        return real_run(call, config, do, dht, **kept)

    dispatch.register_backend(dataclasses.replace(dispatch.get_backend("triton"), run_backward=spy))
    a = args_of(SHAPE)
    leaves = {n: a[n].requires_grad_(True) for n in ("q", "k", "v", "g", "beta")}
    o, _ = chunk_kda(**leaves, initial_state=a["initial_state"])
    o.sum().backward()
    assert used == [record["config"]] and leaves["q"].grad is not None


@pytest.mark.parametrize("config, needle", [({"bwd_nonsense": 1}, "unknown Triton BackwardConfig key"),
                                            ({"bwd_intra_BK": 24}, "power of two")])
def test_an_invalid_backward_entry_is_skipped_with_the_reason(triton_on_cpu, config, needle):
    write_entry(SHAPE, {"backend": "triton", "config": config, "time_ms": 1.0})
    choice = explain_backward(SHAPE)
    assert choice.backend.name == "triton" and choice.config == {}
    assert "default order" in choice.reason and needle in choice.reason
    why = [v for k, v in choice.rejected.items() if k.startswith("triton (from tuned table")]
    assert why and "not valid in this version" in why[0] and needle in why[0]
    forced = explain_backward(SHAPE, backend="triton")
    assert forced.config == {} and "not valid in this version" in forced.reason


def test_backward_bit_changing_knobs_are_fixed_by_the_sequence_class(triton_on_cpu, monkeypatch):
    """A single sequence (p1) and five (p4) of one backward sequence class: fake timings make the batch prefer
    another K slice of the intra stage (bit-changing), which the class's anchor forbids; its bit-neutral knob
    is its own.  Every config is still checked with the real kernels against the reference backward."""
    triton = dispatch.get_backend("triton")
    dispatch.register_backend(dataclasses.replace(
        triton, backward_configs=lambda call: [{}, {"bwd_intra_BK": 16}, {"bwd_state_warps": 8}]))

    def fake_time(backend, config, call, do, dht):
        batch = call.problem.N > 1
        return 5.0 - 2 * (config.get("bwd_intra_BK", 32) == (32 if batch else 16)) \
            - (config.get("bwd_state_warps", 4) == (8 if batch else 4))

    monkeypatch.setattr(autotune, "time_backward_config", fake_time)
    alone = SHAPE
    batch = TuneShape(dataclasses.replace(SHAPE.bucket, parallelism="p4"), N=5, T=20, H=1, HV=1)
    lines = []
    found = autotune.tune([alone, batch], "cpu", backends=["triton"], log=lines.append)
    a, b = found[alone.bucket.key], found[batch.bucket.key]
    assert a["config"] == {"bwd_intra_BK": 16} and a["anchor"]
    assert b["config"] == {"bwd_intra_BK": 16, "bwd_state_warps": 8} and not b["anchor"]
    assert buckets.bit_changing_part("triton", a["config"]) == buckets.bit_changing_part("triton", b["config"])
    assert any(line.startswith(batch.bucket.key) and "fixed by its sequence class" in line for line in lines)
    # a varlen pack (another layout, same class, no entry of its own) runs the class's knobs
    pack = make_inputs(B=1, T=40, H=1, K=16, V=16, dtype=torch.float32, cu_seqlens=[0, 15, 40], seed=0)
    choice = explain(**pack, op="chunk_backward")
    assert choice.config["bwd_intra_BK"] == 16 and "same sequence class" in choice.reason



def test_the_backward_is_checked_and_timed_from_what_its_training_forward_keeps(triton_on_cpu):
    """A backend with a training forward has its backward configs checked and timed as a training call runs them:
    from the tensors that forward keeps."""
    triton = dispatch.get_backend("triton")
    seen = []

    def spy(call, config, do, dht, kept=None):
        seen.append(None if kept is None else len(kept))
        return triton.run_backward(call, config, do, dht, kept=kept)

    backend = dataclasses.replace(triton, run_backward=spy)
    call = autotune.make_call(SHAPE.bucket, SHAPE.N, SHAPE.T, SHAPE.H, SHAPE.HV, "cpu", 0)
    do, dht = autotune.make_cotangents(call, 1)
    assert autotune.check_backward_config(backend, {}, call, do, dht, autotune.BACKWARD_TOLERANCE["fp32"]) is None
    assert autotune.time_backward_config(backend, {}, call, do, dht) > 0
    assert seen and all(n == 2 for n in seen)
