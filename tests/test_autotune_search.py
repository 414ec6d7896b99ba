"""The autotuner's search, buckets, table transfer and batch-invariance rules on CPU, with fake backends and fake
timings: defaults first and slow backends dropped, one stage at a time, the table written after every timed
config and resumed, bucket order, keys with gate/prologue/parallelism, borrowed tables, dtype tolerance, gains."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from kda_compile import autotune, buckets, dispatch, explain, tuning_table
from kda_compile.autotune_search import BucketSearch, Candidate, OutOfTime, stages
from kda_compile.buckets import Bucket, TuneShape, bucket_of
from kda_compile.reference_backend import run_reference

from kda_inputs import make_inputs


# ------------------------------------------------------------------------------ the search, fake timings

def fake_time(config):
    """A separable cost: stage a prefers a_x=2, stage b prefers b_y=3, the default is a_x=1, b_y=1."""
    return 10.0 - (config.get("a_x", 1) == 2) * 3 - (config.get("b_y", 1) == 3) * 2


SPACE = [{"a_x": 2}, {"b_y": 2}, {"a_x": 3}, {"b_y": 3}, {"b_y": 4}]


def test_stages_group_by_knob_prefix_in_order():
    groups = stages([{}, {"state_BV": 16, "state_warps": 8}, {"o_BK": 64}, {"state_BV": 32, "state_warps": 4}])
    assert groups == [[{"state_BV": 16, "state_warps": 8}, {"state_BV": 32, "state_warps": 4}], [{"o_BK": 64}]]
    # a full product (3 x 2 x 2 = 12 configs) is searched knob by knob: 3 + 2 + 2 moves
    product = [{"state_BV": bv, "state_warps": w, "state_stages": s} for bv in (16, 32, 64) for w in (4, 8)
               for s in (2, 3)]
    assert stages(product) == [[{"state_BV": 16}, {"state_BV": 32}, {"state_BV": 64}, {"state_warps": 4},
                                {"state_warps": 8}, {"state_stages": 2}, {"state_stages": 3}]]


def test_triton_chunk_space_is_small_enough_for_the_time_budget():
    """The Triton forward's space, searched stage by stage and knob by knob: a few dozen timings per bucket."""
    from kda_compile.kernels_triton import chunk_fwd
    moves = sum(len(stage) for stage in stages(chunk_fwd.get_configs()))
    assert 10 <= moves <= 24, moves


def test_search_is_greedy_per_stage_not_the_product():
    measured = []

    def measure(name, config):
        measured.append(config)
        return fake_time(config), None

    record = BucketSearch("k", [Candidate("x", {}, SPACE)], measure, log=lambda *a: None).run()
    assert record["config"] == {"a_x": 2, "b_y": 3} and record["time_ms"] == 5.0 and record["done"]
    assert len(measured) == 1 + len(SPACE)        # the default, then each alternative once (product: 3 x 4)
    assert record["default"] == {"backend": "x", "config": {}, "time_ms": 10.0}
    assert all(c.get("a_x") == 2 for c in measured[3:])   # stage b searched around stage a's best


def test_slow_backend_dropped_and_unfit_backend_recorded():
    logs = []

    def measure(name, config):
        if name == "wrong":
            return None, "output relative error 5.0e-01 > 3e-03"
        return (1.0 if name == "fast" else 2.0) - 0.1 * bool(config), None

    cands = [Candidate(n, {}, [{"a_x": 2}]) for n in ("slow", "fast", "wrong")]
    record = BucketSearch("k", cands, measure, log=logs.append, untuned="slow").run()
    assert "slow" in record["dropped"] and "1.5x the best default" in record["dropped"]["slow"]
    assert any("dropped slow" in line for line in logs)
    assert set(record["unfit"]) == {"wrong"}
    assert record["backend"] == "fast" and record["config"] == {"a_x": 2}
    assert record["default"]["backend"] == "slow"   # the gain is against what dispatch ran untuned
    assert [e[0] for e in record["timed"]].count("slow") == 1   # dropped after its default


def test_every_timed_config_is_saved_and_a_rerun_resumes():
    saved, measured = [], []

    def measure(name, config):
        if len(measured) == 3:
            raise OutOfTime
        measured.append(config)
        return fake_time(config), None

    first = BucketSearch("k", [Candidate("x", {}, SPACE)], measure, save=saved.append, log=lambda *a: None)
    partial = first.run()
    assert not partial["done"] and len(saved) == 3 + 1 and partial["time_ms"] == 7.0   # best so far kept
    assert [len(r["timed"]) for r in saved[:3]] == [1, 2, 3]
    measured.clear()
    prior = json.loads(json.dumps(partial))   # as read back from the table
    again = BucketSearch("k", [Candidate("x", {}, SPACE)], lambda n, c: (measured.append(c), (fake_time(c), None))[1],
                         prior=prior, log=lambda *a: None).run()
    assert again["done"] and again["config"] == {"a_x": 2, "b_y": 3}
    assert len(measured) == len(SPACE) + 1 - 3   # the three recorded configs are not measured again


# ------------------------------------------------------------------------------------------ buckets

def call_of(N=1, T=70, HV=1, cu=None, **flags):
    args = make_inputs(B=N, T=T, H=1, HV=HV, K=8, V=8, dtype=torch.float32, cu_seqlens=cu,
                       gate="raw" if flags.get("use_gate_in_kernel") else "log")
    return explain_call(args, **flags)


def explain_call(args, **flags):
    captured = {}
    real = dispatch.choose

    def spy(call, backend=None):
        captured["call"] = call
        return real(call, backend)
    dispatch.choose = spy
    try:
        explain(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("g"), args.pop("beta"), **args, **flags)
    finally:
        dispatch.choose = real
    return captured["call"]


def test_key_carries_gate_mode_prologues_and_parallelism():
    assert bucket_of(call_of()).key == "chunk/fp32/K8V8/T1k/dense/log/none/p1"
    safe = call_of(use_gate_in_kernel=True, safe_gate=True, lower_bound=-5.0, use_qk_l2norm_in_kernel=True,
                   use_beta_sigmoid_in_kernel=True)
    assert bucket_of(safe).key == "chunk/fp32/K8V8/T1k/dense/safe/l2n+bsig/p1"
    assert bucket_of(call_of(use_gate_in_kernel=True)).gate == "gate"
    wide = call_of(N=4, HV=2)
    assert [bucket_of(wide, sms=s).parallelism for s in (16, 8, 1)] == ["p0", "p1", "p4"]
    assert bucket_of(wide, sms=16).sequence_key == bucket_of(wide, sms=1).sequence_key


def test_varlen_pack_is_classed_by_its_longest_sequence_when_offsets_are_on_the_cpu():
    pack = call_of(cu=[0, 900, 1800, 2700])          # 2700 packed tokens, sequences of 900
    assert bucket_of(pack).length == "T1k"
    pack.cu_seqlens = torch.tensor([0, 900, 1800, 2700], device="meta")   # offsets on a device: packed T
    assert bucket_of(pack).length == "T8k"


def test_default_buckets_most_used_first(monkeypatch):
    monkeypatch.setattr(buckets, "sm_count", lambda device: 132)
    shapes = buckets.default_tune_shapes("cuda", dtypes=("bf16",), dims=(128,))
    kinds = [f"{s.bucket.op}/{s.bucket.length}/{s.bucket.layout}" for s in shapes]
    assert kinds[:8] == ["chunk/T8k/dense"] * 2 + ["recurrent/t1/dense"] * 2 + ["chunk/Tlong/dense"] * 2 + \
        ["chunk/Tlong/varlen"] * 2   # 4 x 4096 tokens, offsets on the GPU: classed by the packed T
    assert {s.bucket.gate for s in shapes} == {"log", "safe"}
    b8 = [s for s in shapes if (s.N, s.T, s.H) == (8, 4096, 32)]
    b2 = [s for s in shapes if (s.N, s.T, s.H) == (2, 8192, 16)]
    assert b8 and b2 and b8[0].bucket.key != b2[0].bucket.key   # B8·T4096·H32 no longer shares B2·T8192·H16's
    assert b8[0].bucket.sequence_key == b2[0].bucket.sequence_key


def test_bit_changing_and_neutral_lists_cover_every_knob():
    from kda_compile.kernels_tl import config as tl
    from kda_compile.kernels_triton import config as tr
    for name, classes in (("triton", (tr.ChunkConfig, tr.DecodeConfig, tr.BackwardConfig)),
                          ("tilelang", (tl.ChunkConfig, tl.DecodeConfig, tl.BackwardConfig))):
        knobs = {f.name for cls in classes for f in dataclasses.fields(cls)} - {"forward"}
        changing, neutral = set(buckets.BIT_CHANGING[name]), set(buckets.BIT_NEUTRAL[name])
        assert not changing & neutral, name
        assert knobs <= changing | neutral, f"{name}: unclassified knobs {knobs - changing - neutral}"
    assert buckets.is_bit_changing("triton", "intra_BK") and not buckets.is_bit_changing("triton", "o_BV")
    assert buckets.is_bit_changing("triton", "a_new_knob")   # unknown counts as bit-changing


# ---------------------------------------------------------------------------- with the dispatch

class Knobs:
    """A fake backend with a bit-changing knob ``order`` (a K split) and a neutral one ``state_BV``; which values
    are fastest depends on the batch, so untethered tuning would pick different ``order`` per bucket."""

    def __init__(self, wrong_for=()):
        self.wrong_for = wrong_for

    def run(self, call, config):
        o, s = run_reference(call, {})
        if call.problem.dtype in self.wrong_for:
            o = o * 1.5
        return o, s

    def backend(self):
        def time(backend, config, call):
            big = call.problem.N > 1
            return 5.0 - (config.get("order") == (2 if big else 3)) * 2 - (config.get("state_BV") == (16 if big
                                                                                                       else 32))
        self.time = time
        return dispatch.Backend(name="knobs", supports=lambda call: None, run=self.run,
                                configs=lambda call: [{"order": 2}, {"order": 3}, {"state_BV": 16},
                                                      {"state_BV": 32}])


@pytest.fixture
def knobs(tmp_path, monkeypatch):
    monkeypatch.setenv("KDA_COMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KDA_COMPILE_BACKEND", raising=False)
    monkeypatch.setitem(buckets.BIT_NEUTRAL, "knobs", ("state_BV",))
    tuning_table.invalidate()
    fake = Knobs(wrong_for=(torch.float16,))
    dispatch.register_backend(fake.backend())
    monkeypatch.setattr(autotune, "time_config", fake.time)
    yield fake
    dispatch.unregister_backend("knobs")
    tuning_table.invalidate()


def test_parallelism_classes_differ_only_in_bit_neutral_knobs(knobs):
    alone = TuneShape(Bucket("chunk", "fp32", 8, 8, "T1k", "dense", "log", "none", "p1"), 1, 70, 1, 1)
    batch = TuneShape(Bucket("chunk", "fp32", 8, 8, "T1k", "dense", "log", "none", "p4"), 8, 70, 1, 1)
    lines = []
    found = autotune.tune([alone, batch], "cpu", backends=["knobs"], log=lines.append)
    a, b = found[alone.bucket.key], found[batch.bucket.key]
    assert a["config"] == {"order": 3, "state_BV": 32}
    assert b["config"] == {"order": 3, "state_BV": 16}   # its own neutral knob, the class's bit-changing one
    assert a["anchor"] and not b["anchor"]
    assert b["default"] == {"backend": "knobs", "config": {}, "time_ms": 5.0}   # the untuned dispatch's config
    assert any("fixed by its sequence class" in line for line in lines)
    # a table edited (or tuned by an older version) to break the rule is repaired when loaded
    entries = {alone.bucket.key: a, batch.bucket.key: dict(b, config={"order": 2, "state_BV": 16}),
               "chunk/fp32/K8V8/T1k/varlen/log/none/p1": dict(b, backend="reference", config={})}
    fixed, notes = tuning_table.normalize_entries(entries)
    assert fixed[batch.bucket.key]["config"] == {"order": 3, "state_BV": 16}
    assert "chunk/fp32/K8V8/T1k/varlen/log/none/p1" not in fixed
    assert any("batch invariance" in n for n in notes) and any("bit-changing knobs" in n for n in notes)


def test_a_bucket_without_entry_takes_its_sequence_class_entry(knobs):
    alone = TuneShape(Bucket("chunk", "fp32", 8, 8, "T1k", "dense", "log", "none", "p1"), 1, 70, 1, 1)
    autotune.tune([alone], "cpu", backends=["knobs"], log=lambda *a: None)
    pack = call_of(cu=[0, 30, 70])                       # varlen: another layout, same sequence class
    choice = dispatch.choose(pack)
    assert choice.backend.name == "knobs" and choice.config["order"] == 3
    assert "same sequence class" in choice.reason


def test_backend_outside_the_dtype_tolerance_is_never_chosen(knobs):
    shape = TuneShape(Bucket("chunk", "fp16", 8, 8, "T1k", "dense", "log", "none", "p1"), 1, 70, 1, 1)
    found = autotune.tune([shape], "cpu", backends=["knobs", "reference"], log=lambda *a: None)
    record = found[shape.bucket.key]
    assert "knobs" in record["unfit"] and record["backend"] == "reference"
    args = make_inputs(B=1, T=1500, H=1, K=8, V=8, dtype=torch.float16)
    q, k, v, g, beta = (args.pop(n) for n in ("q", "k", "v", "g", "beta"))
    # an fp16 bucket of another sequence class, with no entry: the default order would put knobs first
    choice = explain(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, **args)
    assert choice.backend.name == "reference" and "default order" in choice.reason
    assert "misses the fp16 tolerance" in choice.rejected["knobs"]
    assert explain(q.float(), k.float(), v.float(), g.float(), beta.float(), use_qk_l2norm_in_kernel=True,
                   **args).backend.name == "knobs"   # fine for fp32
    assert autotune.TOLERANCE["fp16"] >= 1e-2


def test_tolerances_are_the_tests():
    import test_chunk
    for name, dtype in (("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16")):
        assert autotune.TOLERANCE[name] == test_chunk.GPU_TOL[dtype]


def test_gains_are_printed_and_explained(knobs, capsys):
    shape = TuneShape(Bucket("chunk", "fp32", 8, 8, "T1k", "dense", "log", "l2n", "p1"), 1, 100, 1, 1)
    autotune.tune([shape], "cpu", backends=["knobs"], log=print)
    out = capsys.readouterr().out
    assert f"{shape.bucket.key}: default knobs 5.000 ms -> tuned knobs" in out and "(2.50x)" in out
    autotune.explain_table([shape], "cpu")
    assert "gain: default knobs 5.000 ms" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ shipped tables

H800 = {"device": "NVIDIA H800", "capability": "9.0", "torch": "9.9", "triton": "9.9", "tilelang": "9.9"}


def test_the_shipped_h200_table_is_found_for_an_h200():
    entries, name = tuning_table.load_shipped_table(dict(H800, device="NVIDIA H200"))
    assert name == "h200.json"
    assert {"chunk/bf16/K128V128/T8k/dense/log/l2n/p0", "recurrent/bf16/K128V128/t1/dense/log/l2n/p4"} <= set(entries)


def test_a_gpu_without_table_borrows_one_of_its_compute_capability(monkeypatch):
    entries, name, note = tuning_table.borrow_shipped_table(H800, sms=132)
    # both shipped sm_90 tables have 132 SMs; the one the current tuner measured wins over the carried-over one
    assert name == "h200.json" and "borrowed" in note and "same SM count" in note
    assert "132 SMs there against 141 here" in tuning_table.borrow_shipped_table(H800, sms=141)[2]
    assert tuning_table.borrow_shipped_table(dict(H800, capability="8.0"))[1] is None
    monkeypatch.setattr(tuning_table, "machine_identity", lambda device=None: dict(H800))
    monkeypatch.setenv("KDA_COMPILE_CACHE_DIR", "/nonexistent-kda-cache")
    tuning_table.invalidate()
    try:
        prefill = Bucket("chunk", "bf16", 128, 128, "T1k", "dense", "log", "l2n", "p1")
        record, source = tuning_table.lookup(autotune.make_call(prefill, 2, 64, 1, 1, "cpu", 0))
        assert record["backend"] == "triton" and "h200.json" in source and "borrowed" in source
    finally:
        tuning_table.invalidate()


def test_shipped_table_is_in_the_current_form():
    for name, data in tuning_table._shipped_tables():
        fixed, notes = tuning_table.normalize_entries(data["entries"])
        assert notes == [] and fixed.keys() == data["entries"].keys(), name
        for key, record in data["entries"].items():
            backend = dispatch.get_backend(record["backend"])
            assert dispatch.config_error(backend, Bucket.parse(key).op, record["config"]) is None


# ------------------------------------------------------------------------------------------ cold start

def test_a_call_that_runs_elsewhere_never_imports_tilelang():
    code = ("import sys, torch\nfrom kda_compile import chunk_kda\n"
            "q = torch.randn(1, 20, 1, 16); g = torch.nn.functional.logsigmoid(torch.randn(1, 20, 1, 16))\n"
            "chunk_kda(q, q, q, g, torch.rand(1, 20, 1))\n"
            "from kda_compile import dispatch\nassert 'tilelang' in dispatch.backends() or dispatch._UNAVAILABLE\n"
            "print('tilelang' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_fixed_bucket_never_takes_another_backend():
    def measure(name, config):
        return (1.0 if name == "other" else 3.0), None

    cands = [Candidate("mine", {}, [{"state_BV": 16}]), Candidate("other", {}, [])]
    record = BucketSearch("k", cands, measure, fixed=("mine", {}), untuned="other", log=lambda *a: None).run()
    assert record["backend"] == "mine" and set(record["per_backend"]) == {"mine"}
    assert record["default"]["backend"] == "other" and not record["anchor"]


def test_the_untuned_default_never_wins_against_the_class_knobs():
    """The untuned dispatch's default is timed for the gain; when its bit-changing knobs are not the class's it
    may not win, however fast."""
    def measure(name, config):
        return (1.0 if config == {} else 3.0 - (config.get("o_BV") == 64)), None

    cands = [Candidate("triton", {}, [{"o_BV": 64}])]   # intra_BK changes bits, o_BV does not
    record = BucketSearch("k", cands, measure, fixed=("triton", {"intra_BK": 16}), untuned="triton",
                          log=lambda *a: None).run()
    assert record["config"] == {"intra_BK": 16, "o_BV": 64} and record["time_ms"] == 2.0
    assert record["default"] == {"backend": "triton", "config": {}, "time_ms": 1.0}


# ------------------------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
def test_tuned_dispatch_keeps_batch_invariance_on_cuda(tmp_path, monkeypatch):
    """Tune a single sequence and a batch of 8 (other parallelism classes, maybe other bit-neutral knobs) and a
    varlen pack with the real backends, then check one sequence gives the same bits alone, in the batch and in
    the pack; and that the tuned table says what tuning gained."""
    from kda_compile import chunk_kda
    from kda_compile.buckets import tune_shape
    monkeypatch.setenv("KDA_COMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KDA_COMPILE_BACKEND", raising=False)
    tuning_table.invalidate()
    T, H, D = 1024, 32, 128   # 32 and 256 (sequence, head) programs: parallelism classes p0 and p1
    shapes = [tune_shape("chunk", "bf16", D, N, T, H, sms=buckets.sm_count("cuda")) for N in (1, 8)]
    lines = []
    found = autotune.tune(shapes, "cuda", max_configs=6, log=lines.append)
    assert len(found) == 2 and any("(" in line and "x)" in line for line in lines)
    one, eight = (found[s.bucket.key] for s in shapes)
    assert one["backend"] == eight["backend"]
    assert buckets.bit_changing_part(one["backend"], one["config"]) == \
        buckets.bit_changing_part(eight["backend"], eight["config"])
    args = make_inputs(B=8, T=T, H=H, K=D, V=D, dtype=torch.bfloat16, device="cuda", seed=1)
    q, k, v, g, beta, h0 = (args[n] for n in ("q", "k", "v", "g", "beta", "initial_state"))
    batch, _ = chunk_kda(q, k, v, g, beta, initial_state=h0, use_qk_l2norm_in_kernel=True)
    alone, _ = chunk_kda(q[:1], k[:1], v[:1], g[:1], beta[:1], initial_state=h0[:1], use_qk_l2norm_in_kernel=True)
    flat = [x.reshape(1, 8 * T, *x.shape[2:]) for x in (q, k, v, g, beta)]
    cu = torch.arange(0, 8 * T + 1, T, device="cuda", dtype=torch.int32)
    pack, _ = chunk_kda(*flat, initial_state=h0, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    assert torch.equal(batch[:1], alone) and torch.equal(pack[:, :T], alone)
    tuning_table.invalidate()


@pytest.mark.parametrize("other_ms, winner", [(0.98, "home"), (0.96, "other")])
def test_another_backend_must_win_by_the_switch_margin(other_ms, winner):
    """The untuned backend keeps the bucket unless another is faster by more than SWITCH_MARGIN (3 %)."""
    def measure(name, config):
        return (1.0 if name == "home" else other_ms), None

    cands = [Candidate(n, {}, []) for n in ("home", "other")]
    record = BucketSearch("k", cands, measure, log=lambda *a: None, untuned="home").run()
    assert record["backend"] == winner
    assert record["time_ms"] == (1.0 if winner == "home" else other_ms)
    assert set(record["per_backend"]) == {"home", "other"}   # both timings kept
