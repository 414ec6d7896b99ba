"""``python -m kda_compile.autotune``: measure, per shape bucket, the fastest correct backend and kernel config
on this machine and persist it for the dispatch (:mod:`kda_compile.dispatch` reads it).

Buckets (:mod:`kda_compile.buckets`) are tuned most used first.  In each, every backend's default config is
checked and timed first; a backend whose default misses the dtype's tolerance is recorded as unfit for that dtype
(the dispatch never picks it), one whose default is more than 1.5x the best default is dropped; the others are
searched one stage at a time around the current best (:mod:`kda_compile.autotune_search`).  Every config is
first run on a small ragged problem (initial state, varlen for varlen buckets) against the float64 reference and
only timed when correct; a wrong or crashing config is recorded as rejected.  The table is written after every
timed config (best so far, atomically), with the timings, so a run stopped by ``--budget`` keeps its results
and a rerun resumes where it stopped.  Bit-changing knobs and the backend are fixed per sequence class by the
class's first tuned bucket (batch invariance).  The end of a run prints each bucket's gain over the default.

Backward buckets (op ``chunk_bwd``) search each backend's backward configs (``Backend.backward_configs``): a config
is timed as the backward alone (``run_backward`` with fixed random output and final-state gradients), from what the
backend's training forward keeps for it (``run_training``, run once before, untimed) as a training call runs it, or
recomputing everything for a backend without one, and checked, every gradient, against the float64 reference
backward (:mod:`kda_compile.reference_bwd`) within :data:`BACKWARD_TOLERANCE`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from tqdm import tqdm

from . import dispatch, tuning_table
from .autotune_search import BucketSearch, Candidate, OutOfTime
from .buckets import (BACKWARD_OP, GATES, NAME_DTYPES, TUNED_OPS, Bucket, TuneShape, bit_changing_part,
                      default_tune_shapes, sm_count)
from .checks import Problem
from .reference import KDAOptions, kda_reference
from .reference_bwd import kda_reference_bwd

# Relative error allowed per input dtype: the GPU tolerances of the tests (tests/test_chunk.py GPU_TOL; float32
# products may run as TF32 where PyTorch allows it).  A backend whose default misses it is unfit for that dtype.
TOLERANCE = {"fp64": 1e-8, "fp32": 3e-3, "fp16": 1e-2, "bf16": 3e-2}
# The same for every gradient of a backward, against the float64 reference backward: the backward tests' bounds
# at small sizes (tests/test_triton_bwd.py TOL; float32 as tests/test_chunk_bwd.py on a GPU, where products may run
# as TF32).  Not bf16's 1e-2 of the GPU test at the standard shapes: on a small ragged problem correct Triton
# kernels reach 1.1e-2 (dg, K = V = 16, measured through the interpreter).
BACKWARD_TOLERANCE = {"fp64": 1e-8, "fp32": 3e-3, "fp16": 1e-2, "bf16": 3e-2}
GRADIENT_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0", "dA_log", "ddt_bias")
# Default --budget, counted from the start of main(): on the H200 the process spent ~5 s importing before it, and a
# config started within the budget may end up to one compile after it (the run of 2026-12-02 with a 300 s budget
# counted from the plan took 321 s in all)
DEFAULT_BUDGET_S = 285.0


# ----------------------------------------------------------------------------------------- problem setup

def make_call(bucket: Bucket, N: int, T: int, H: int, HV: int, device: str, seed: int,
              with_state: bool = True, ragged: bool = False) -> dispatch.KDACall:
    """A KDACall of the bucket's op/dtype/dims/gate/prologues with fresh random inputs (a chunk call for a
    backward bucket).  ``ragged`` makes varlen sequences of unequal lengths."""
    gen = torch.Generator().manual_seed(seed)
    dtype = NAME_DTYPES[bucket.dtype]
    K, V = bucket.K, bucket.V
    varlen = bucket.layout == "varlen"
    if varlen:
        lengths = [max(1, T - (n * T) // (2 * N)) if ragged else T for n in range(N)]
        offsets = [0]
        for length in lengths:
            offsets.append(offsets[-1] + length)
        B, total = 1, offsets[-1]
        cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=device)
    else:
        B, total, cu_seqlens = N, T, None

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    flags = set(bucket.flags.split("+"))
    q, k, v = rand(B, total, H, K), rand(B, total, H, K), rand(B, total, HV, V)
    if "l2n" not in flags:
        k = k / K ** 0.5
    in_kernel = bucket.gate != "log"
    g = rand(B, total, HV, K) if in_kernel else torch.nn.functional.logsigmoid(rand(B, total, HV, K) + 3.0)
    beta = rand(B, total, HV) if "bsig" in flags else torch.rand(B, total, HV, generator=gen)
    q, k, v, g, beta = (x.to(device=device, dtype=dtype) for x in (q, k, v, g, beta))
    fp = torch.float64 if dtype == torch.float64 else torch.float32
    state = (rand(N, HV, K, V) * 0.1).to(device=device, dtype=fp) if with_state else None
    A_log = (rand(HV) * 0.5).to(device=device, dtype=fp) if in_kernel else None
    dt_bias = (rand(HV * K) * 0.5).to(device=device, dtype=fp) if in_kernel else None
    problem = Problem(B=B, T=total, H=H, HV=HV, K=K, V=V, N=N, varlen=varlen, dtype=dtype,
                      device=torch.device(device))
    opts = KDAOptions(scale=K ** -0.5, use_qk_l2norm_in_kernel="l2n" in flags, use_gate_in_kernel=in_kernel,
                      use_beta_sigmoid_in_kernel="bsig" in flags, allow_neg_eigval="neg" in flags,
                      lower_bound=-5.0 if bucket.gate == "safe" else None)
    return dispatch.KDACall(TUNED_OPS[bucket.op], problem, opts, q, k, v, g, beta, state, cu_seqlens, A_log=A_log,
                            dt_bias=dt_bias, output_final_state=True)


def make_cotangents(call: dispatch.KDACall, seed: int) -> tuple:
    """Fixed random gradients ``(do, dht)`` of a chunk call's output (v's dtype) and final state (float32)."""
    gen = torch.Generator().manual_seed(seed)
    p = call.problem
    do = torch.randn(*call.v.shape, generator=gen).to(device=p.device, dtype=p.dtype)
    fp = torch.float64 if p.dtype == torch.float64 else torch.float32
    dht = (torch.randn(p.N, p.HV, p.K, p.V, generator=gen) * 0.1).to(device=p.device, dtype=fp)
    return do, dht


def _run_guarded(fn, cuda: bool):
    """``(result, None)``, or ``(None, reason)`` when ``fn`` raises: a crashing config is rejected, not fatal."""
    try:
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        return result, None
    except Exception as exc:
        return None, f"crashed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _float64_inputs(call: dispatch.KDACall) -> list:
    """The call's q, k, v, g, beta, initial state, A_log and dt_bias in float64 (None stays None)."""
    return [x.double() if x is not None and x.is_floating_point() else x
            for x in (call.q, call.k, call.v, call.g, call.beta, call.initial_state, call.A_log, call.dt_bias)]


def _compare(named: list, tolerance: float) -> str | None:
    """The first of ``(name, got, want)`` whose relative error exceeds ``tolerance`` (or that is missing or
    misshapen), as a reason; None when all agree.  ``want`` None: nothing to compare."""
    for name, got, want in named:
        if want is None:
            continue
        if got is None:
            return f"returned no {name}"
        if got.shape != want.shape:
            return f"{name} has shape {list(got.shape)}, expected {list(want.shape)}"
        err = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
        if not err <= tolerance:  # also catches NaN
            return f"{name} relative error {err:.2e} > {tolerance:.0e}"
    return None


def check_config(backend: dispatch.Backend, config: dict, call: dispatch.KDACall, tolerance: float) -> str | None:
    """Run one config on ``call`` and compare with the float64 reference; the reason it fails, or None."""
    out, reason = _run_guarded(lambda: backend.run(call, dict(config)), call.q.is_cuda)
    if reason:
        return reason
    q, k, v, g, beta, state0, A_log, dt_bias = _float64_inputs(call)
    ref_o, ref_state = kda_reference(q, k, v, g, beta, state0, call.cu_seqlens, A_log, dt_bias, opts=call.opts,
                                     algorithm="recurrent" if call.op == "recurrent" else "chunk")
    o, state = out
    if state is None:
        return "returned no final state"
    return _compare([("output", o, ref_o), ("final state", state, ref_state)], tolerance)


def _kept(backend: dispatch.Backend, call: dispatch.KDACall) -> dict:
    """``run_backward``'s keywords for ``call`` as a training call passes them: what the backend's training forward
    keeps (``{"kept": ...}``), or none for a backend without one."""
    if backend.run_training is None:
        return {}
    return {"kept": tuple(dispatch.run_training(call, backend, backend.name)[2])}


def check_backward_config(backend: dispatch.Backend, config: dict, call: dispatch.KDACall, do: torch.Tensor,
                          dht: torch.Tensor, tolerance: float) -> str | None:
    """Run one backward config on the chunk ``call`` with gradients ``do``, ``dht`` (after the backend's training
    forward, when it has one) and compare every gradient with the float64 reference backward; the reason it fails,
    or None."""
    grads, reason = _run_guarded(lambda: backend.run_backward(call, dict(config), do, dht, **_kept(backend, call)),
                                 call.q.is_cuda)
    if reason:
        return reason
    q, k, v, g, beta, state0, A_log, dt_bias = _float64_inputs(call)
    want = kda_reference_bwd(q, k, v, g, beta, state0, call.cu_seqlens, A_log, dt_bias, call.opts, do.double(),
                             dht.double())
    if len(grads) != len(want):
        return f"returned {len(grads)} gradients, expected {len(want)}"
    return _compare(list(zip(GRADIENT_NAMES, grads, want)), tolerance)


def time_config(backend: dispatch.Backend, config: dict, call: dispatch.KDACall) -> float:
    """Median milliseconds of one call (CUDA: triton.testing.do_bench; CPU: wall clock).  Decode calls on CUDA
    are timed as CUDA-graph replays, as serving engines run them: a decode kernel takes a few to a hundred µs,
    less than the host's launch time, so back-to-back eager calls would time the host, not the config."""
    fn = lambda: backend.run(call, dict(config))  # noqa: E731
    if call.op == "recurrent" and call.q.is_cuda:
        try:
            import triton.testing
            fn()
            torch.cuda.synchronize()
            return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
        except ImportError:
            pass
        except RuntimeError:  # a backend that cannot be captured is timed eagerly
            torch.cuda.synchronize()
    return _median_ms(fn, call.q.is_cuda)


def time_backward_config(backend: dispatch.Backend, config: dict, call: dispatch.KDACall, do: torch.Tensor,
                         dht: torch.Tensor) -> float:
    """Median milliseconds of the backward of the chunk ``call`` alone, for the fixed gradients ``do``, ``dht``,
    from what the backend's training forward keeps (run once, untimed), or recomputing everything without one."""
    kept = _kept(backend, call)
    return _median_ms(lambda: backend.run_backward(call, dict(config), do, dht, **kept), call.q.is_cuda)


def _median_ms(fn, cuda: bool) -> float:
    """Median milliseconds of ``fn()`` (CUDA: triton.testing.do_bench; CPU: wall clock)."""
    if cuda:
        try:
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except ImportError:
            fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(20):
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------- progress

def progress(total: int, stream=None):
    """``(step, close)``: ``step(text)`` after each finished config.  On a terminal, a tqdm bar whose postfix
    is the last step's text; elsewhere (a log file, CI) tqdm's meter as one plain line per step, with no
    carriage returns."""
    stream = stream or sys.stderr
    if hasattr(stream, "isatty") and stream.isatty():
        bar = tqdm(total=total, file=stream, unit="config", dynamic_ncols=True)

        def step(text: str) -> None:
            bar.set_postfix_str(text, refresh=False)
            bar.update(1)
        return step, bar.close

    start, done = time.perf_counter(), 0

    def step(text: str) -> None:
        nonlocal done
        done += 1
        meter = tqdm.format_meter(done, total, time.perf_counter() - start, ascii=True, unit="config",
                                  postfix=text)
        stream.write(meter + "\n")
        stream.flush()
    return step, lambda: None


# ---------------------------------------------------------------------------------------------- tuning

def _anchor(entries: dict, bucket: Bucket) -> tuple | None:
    """(backend, bit-changing knobs) fixed for ``bucket`` by an entry of its sequence class, or None."""
    for key in sorted(entries, key=lambda k: (not entries[k].get("anchor"), k)):
        other = Bucket.parse(key)
        if key != bucket.key and other.sequence_key == bucket.sequence_key and "backend" in entries[key]:
            record = entries[key]
            return record["backend"], bit_changing_part(record["backend"], record.get("config", {}))
    return None


def _reason(backend: dispatch.Backend, call: dispatch.KDACall, op: str) -> str | None:
    """Why ``backend`` cannot run the tuned ``op`` of ``call`` in the default dispatch (None: it can)."""
    return dispatch.backward_reason(backend, call) if op == BACKWARD_OP else backend.supports(call)


def _search_space(backend: dispatch.Backend, call: dispatch.KDACall, op: str) -> tuple[dict, list[dict]]:
    """(default config, search space) of ``backend`` for the tuned ``op`` of ``call``."""
    if op == BACKWARD_OP:
        return backend.backward_default_config(call), backend.backward_configs(call)
    return backend.default_config(call), backend.configs(call)


def _untuned_backend(call: dispatch.KDACall, names: list[str], op: str) -> str | None:
    """The backend the dispatch would run without a table (first of the default order that supports it)."""
    return next((n for n in dispatch.backends() if n in names and _reason(dispatch.get_backend(n), call, op) is None),
                None)


def tune(shapes: list[TuneShape], device: str, backends: list[str] | None = None, budget_s: float | None = None,
         force: bool = False, output=None, seed: int = 0, max_configs: int | None = None,
         log=print, started: float | None = None) -> dict:
    """Tune ``shapes`` in order; returns {bucket key: record} of the buckets that have a record.  The table
    (``output`` path or the user's table) is written after every timed config; finished buckets are skipped
    unless ``force``, unfinished ones resume with the timings already recorded.  ``budget_s`` counts from
    ``started`` (a ``time.perf_counter()`` value; default: now)."""
    names = [b for b in dispatch.backends() if backends is None or b in backends]
    if backends:
        unknown = sorted(set(backends) - set(dispatch.backends()))
        if unknown:
            raise ValueError(f"--backends: {unknown} not registered here (registered: {dispatch.backends()})")
    identity = tuning_table.machine_identity(device)
    path = output or tuning_table.table_path(identity)
    sms = sm_count(device)

    def table() -> dict:
        existing = tuning_table._read(path) if path.exists() else None
        entries = existing["entries"] if existing and existing["identity"] == identity else {}
        return tuning_table.normalize_entries(entries)[0]

    plan = []  # (shape, [Candidate], skipped)
    total = 0
    for shape in shapes:
        entry = table().get(shape.bucket.key)
        if entry and entry.get("done", True) and not force:
            log(f"skip {shape.bucket.key}: already in {path} (use --force to re-measure)")
            continue
        op = shape.bucket.op
        call = make_call(shape.bucket, shape.N, shape.T, shape.H, shape.HV, device, seed)
        cands, skipped = [], {}
        for name in names:
            backend = dispatch.get_backend(name)
            why_not = _reason(backend, call, op)
            if why_not is not None:
                skipped[name] = why_not
                continue
            default, space = _search_space(backend, call, op)
            space = [c for c in space if c and {**default, **c} != default]
            cands.append(Candidate(name, default, space))
            total += 1 + len(space) if max_configs is None else min(max_configs, 1 + len(space))
        total += len(skipped)
        plan.append((shape, cands, skipped, _untuned_backend(call, names, op)))
    step, close_progress = progress(total)
    started = time.perf_counter() if started is None else started
    longest: dict[tuple, float] = {}   # (backend, op) -> longest check-and-time of one config so far, s
    finished: dict[str, dict] = {}
    out_of_time = False

    for shape, cands, skipped, untuned in plan:
        key = shape.bucket.key
        for name, why in skipped.items():
            step(f"{key} {name}: skipped: {why}")
        timing_call = make_call(shape.bucket, shape.N, shape.T, shape.H, shape.HV, device, seed)
        small = make_call(shape.bucket, 2, 2 * 64 + 37 if TUNED_OPS[shape.bucket.op] == "chunk" else
                          (1 if shape.bucket.length == "t1" else 3), shape.H, shape.HV, device, seed + 1, ragged=True)
        backward = shape.bucket.op == BACKWARD_OP
        if backward:  # fixed output and final-state gradients, made once per bucket
            timing_grads, small_grads = make_cotangents(timing_call, seed + 2), make_cotangents(small, seed + 3)

        entries = table()
        prior = None if force else entries.get(key)
        # wall seconds each backend's configs took in this bucket (compile, check and timing), over every run
        seconds = {name: float(s) for name, s in ((prior or {}).get("seconds") or {}).items()}

        def measure(name: str, config: dict) -> tuple:
            # a config is not started when the longest config of its backend and op so far (compile included:
            # TileLang's take 6-36 s) would end past the budget
            slot = (name, shape.bucket.op)
            if budget_s is not None and time.perf_counter() - started + longest.get(slot, 0.0) > budget_s:
                raise OutOfTime
            t0 = time.perf_counter()
            try:
                return checked_time(name, config)
            finally:
                spent = time.perf_counter() - t0
                longest[slot] = max(longest.get(slot, 0.0), spent)
                seconds[name] = round(seconds.get(name, 0.0) + spent, 1)

        def checked_time(name: str, config: dict) -> tuple:
            backend = dispatch.get_backend(name)
            if backward:
                reason = check_backward_config(backend, config, small, *small_grads,
                                               BACKWARD_TOLERANCE[shape.bucket.dtype])
            else:
                reason = check_config(backend, config, small, TOLERANCE[shape.bucket.dtype])
            if reason:
                return None, reason
            try:
                if backward:
                    return time_backward_config(backend, config, timing_call, *timing_grads), None
                return time_config(backend, config, timing_call), None
            except Exception as exc:
                return None, f"crashed while timing: {type(exc).__name__}: {exc}"[:300]

        fixed = _anchor(entries, shape.bucket)
        if fixed is not None:
            log(f"{key}: backend {fixed[0]} and bit-changing knobs {fixed[1]} fixed by its sequence class "
                f"(batch invariance); searching the bit-neutral knobs only")
        s = shape
        search = BucketSearch(
            key, cands, measure, log=log, step=step, fixed=fixed, untuned=untuned, prior=prior,
            max_configs=max_configs,
            save=lambda record: tuning_table.write_entries({key: record}, identity, path, sm_count=sms),
            extra={"shape": f"N{s.N} T{s.T} H{s.H} HV{s.HV}", "skipped": skipped, "seconds": seconds})
        record = search.run()
        if record is not None:
            finished[key] = record
        if not search.done:
            out_of_time = True
            break
        if record is None:
            log(f"{key}: no correct candidate; skipped: {skipped}")
        else:
            log(f"{key}: {record['backend']} {record['config']} {record['time_ms']:.3f} ms "
                f"({record['candidates']} timed or checked, {len(record['rejected'])} rejected, "
                f"{_seconds_text(seconds)}) -> {path}")
    close_progress()
    if out_of_time:
        log(f"time budget of {budget_s:.0f} s used up: best configs so far kept in {path}; run again to resume")
    log("gains over the default config (" + str(path) + "):")
    entries = table()
    for line in gain_lines({s.bucket.key: entries[s.bucket.key] for s in shapes if s.bucket.key in entries}):
        log("  " + line)
    return finished


def _seconds_text(seconds: dict) -> str:
    """``"41 s: triton 12 s, tilelang 29 s"``: where a bucket's tuning time went, by backend."""
    parts = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
    return f"{sum(seconds.values()):.0f} s" + (f": {parts}" if parts else "")


def gain_lines(entries: dict) -> list[str]:
    """Per bucket: the default's time, the tuned time and their ratio (what tuning gained)."""
    lines = []
    for key, record in entries.items():
        default = record.get("default")
        tuned = f"{record['backend']} {record.get('config', {})} {record['time_ms']:.3f} ms"
        if default and default.get("time_ms"):
            lines.append(f"{key}: default {default['backend']} {default['time_ms']:.3f} ms -> tuned {tuned} "
                         f"({default['time_ms'] / record['time_ms']:.2f}x)" + ("" if record.get("done", True)
                                                                              else ", unfinished")
                         + (f"; tuning took {_seconds_text(record['seconds'])}" if record.get("seconds") else ""))
        else:
            lines.append(f"{key}: tuned {tuned} (no default time recorded)")
    return lines


# ------------------------------------------------------------------------------------------------- CLI

def explain_table(shapes: list[TuneShape], device: str, log=print) -> None:
    """What dispatch would pick for each bucket's representative shape, why, and what tuning gained."""
    identity = tuning_table.machine_identity(device)
    log(f"machine: {identity}")
    log(f"tuned table: {tuning_table.table_path(identity)}")
    for shape in shapes:
        call = make_call(shape.bucket, shape.N, min(shape.T, 256), shape.H, shape.HV, device, 0)
        if call.op == "chunk" and shape.T > 256:  # classify by the real length, build small tensors
            varlen = shape.bucket.layout == "varlen"
            call.problem = call.problem._replace(T=shape.N * shape.T if varlen else shape.T)
            if varlen:  # offsets as on the GPU (not readable without a sync): classed by the packed length
                call.cu_seqlens = call.cu_seqlens.to("meta")
        backward = shape.bucket.op == BACKWARD_OP
        log(f"{shape.bucket.key}:")
        log("  " + str(dispatch.choose_backward(call) if backward else dispatch.choose(call)).replace("\n", "\n  "))
        found = tuning_table.lookup(call, op=shape.bucket.op)
        if found:
            log("  gain: " + gain_lines({shape.bucket.key: found[0]})[0].split(": ", 1)[1])
    for source, notes in tuning_table.table_notes().items():
        for note in notes:
            log(f"note ({source}): {note}")


def _shape_of(bucket: Bucket, device: str) -> TuneShape:
    """A small representative shape for a bucket named with --bucket (its parallelism class as given)."""
    T = {"T1k": 1024, "T8k": 4096, "Tlong": 16384, "t1": 1, "tfew": 4}[bucket.length]
    return TuneShape(bucket, 2, T if device.startswith("cuda") or bucket.op == "recurrent" else 100, 4, 4)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv=None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(
        prog="python -m kda_compile.autotune",
        description="Measure the fastest correct KDA backend and kernel config per shape bucket on this machine "
                    "and save it where the dispatch reads it. Every config is checked against the float64 "
                    "reference before it is timed; finished buckets are kept, so an interrupted run resumes.",
        epilog="examples:\n  python -m kda_compile.autotune                 # tune the default buckets on the GPU\n"
               "  python -m kda_compile.autotune --explain       # show what dispatch picks and why\n"
               "  python -m kda_compile.autotune --budget 600 --dtypes bf16,fp16 --dims 64,128",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--ops", default=",".join(TUNED_OPS),
                        help=f"ops to tune, {BACKWARD_OP} the chunk backward (default: {','.join(TUNED_OPS)})")
    parser.add_argument("--dtypes", default="bf16", help="input dtypes: bf16,fp16,fp32,fp64 (default: bf16)")
    parser.add_argument("--dims", default="128", help="head dims K=V to tune (default: 128)")
    parser.add_argument("--gates", default="log,safe", help=f"gate modes of {GATES} (default: log,safe)")
    parser.add_argument("--bucket", action="append", default=[],
                        help="tune only this bucket key (repeatable), e.g. chunk/bf16/K128V128/T8k/dense/log/l2n/p0")
    parser.add_argument("--backends", default=None, help="only these backends (default: all registered)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help="stop after this many seconds from the start of the run, keeping the best found; a "
                             f"rerun resumes (default {DEFAULT_BUDGET_S:.0f}: with Python's start and the imports, "
                             "a default run ends within 5 minutes; 0: no limit)")
    parser.add_argument("--max-configs", type=int, default=None, help="try at most this many configs per backend")
    parser.add_argument("--force", action="store_true", help="re-measure buckets already in the table")
    parser.add_argument("--output", default=None, help="write this table file instead of the user's cache")
    parser.add_argument("--explain", action="store_true", help="only show what dispatch picks and why")
    parser.add_argument("--list", action="store_true", help="only list the buckets and the table location")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (use --device cpu)")
    dtypes, dims, ops = _csv(args.dtypes), [int(d) for d in _csv(args.dims)], _csv(args.ops)
    for dtype in dtypes:
        if dtype not in NAME_DTYPES:
            parser.error(f"--dtypes: {dtype!r} is not one of {sorted(NAME_DTYPES)}")
    for op in ops:
        if op not in TUNED_OPS:
            parser.error(f"--ops: {op!r} is not one of {list(TUNED_OPS)}")
    gates = _csv(args.gates)
    for gate in gates:
        if gate not in GATES:
            parser.error(f"--gates: {gate!r} is not one of {list(GATES)}")
    shapes = default_tune_shapes(device, dtypes=dtypes, dims=dims, ops=ops, gates=gates)
    if args.bucket:
        try:
            wanted = [Bucket.parse(key) for key in args.bucket]
        except ValueError as exc:
            parser.error(f"--bucket: {exc}")
        by_key = {s.bucket.key: s for s in shapes}
        shapes = [by_key.get(b.key) or _shape_of(b, device) for b in wanted]
    from pathlib import Path
    output = Path(args.output) if args.output else None

    if args.list:
        print(f"table: {output or tuning_table.table_path(tuning_table.machine_identity(device))}")
        for shape in shapes:
            print(f"{shape.bucket.key}  (timed at N{shape.N} T{shape.T} H{shape.H} HV{shape.HV})")
        return 0
    if args.explain:
        explain_table(shapes, device)
        return 0
    print(f"tuning {len(shapes)} bucket(s) on {device} with backends "
          f"{_csv(args.backends) if args.backends else dispatch.backends()}", file=sys.stderr)
    finished = tune(shapes, device, backends=_csv(args.backends) if args.backends else None,
                    budget_s=args.budget or None, started=started,
                    force=args.force, output=output, seed=args.seed, max_configs=args.max_configs)
    print(f"done: {len(finished)} bucket(s) tuned", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
