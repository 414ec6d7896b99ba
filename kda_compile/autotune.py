"""``python -m kda_compile.autotune``: measure, per shape bucket, the fastest correct backend and kernel config
on this machine and persist it for the dispatch (:mod:`kda_compile.dispatch` reads it).

For each bucket (:mod:`kda_compile.buckets`) and each registered backend that supports it, every candidate
config is first run on a small ragged problem (with initial state, and varlen for varlen buckets) and checked
against the float64 reference; a config that is wrong or crashes is recorded as rejected and never timed.
A backend that cannot run the bucket at all (no GPU, other head dims) is recorded as skipped, with its
reason, and is not counted as rejected.
Survivors are timed at the bucket's representative shape (median; ``triton.testing.do_bench`` on a GPU), and
the winner is written to the tuned table (:mod:`kda_compile.tuning_table`) as soon as its bucket finishes, so
an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from . import dispatch, tuning_table
from .buckets import NAME_DTYPES, Bucket, TuneShape, default_tune_shapes
from .checks import Problem
from .reference import KDAOptions, kda_reference

TOLERANCE = {"fp64": 1e-8, "fp32": 2e-3, "fp16": 2e-2, "bf16": 2e-2}  # fp32 may use tf32 tensor cores


@dataclass
class BucketResult:
    """What tuning one bucket found."""

    bucket: Bucket
    shape: TuneShape
    timings: list = field(default_factory=list)   # (ms, backend, config)
    rejected: dict = field(default_factory=dict)  # "backend config" -> why it was wrong or crashed
    skipped: dict = field(default_factory=dict)   # backend -> why it cannot run this bucket here

    def record(self) -> dict | None:
        if not self.timings:
            return None
        ms, backend, config = min(self.timings, key=lambda t: t[0])
        per_backend = {}
        for t_ms, name, cfg in sorted(self.timings, key=lambda t: t[0]):
            per_backend.setdefault(name, {"config": cfg, "time_ms": t_ms})
        s = self.shape
        return {"backend": backend, "config": config, "time_ms": ms, "bucket": self.bucket.key,
                "shape": f"N{s.N} T{s.T} H{s.H} HV{s.HV}", "per_backend": per_backend,
                "candidates": len(self.timings) + len(self.rejected), "rejected": self.rejected,
                "skipped": self.skipped}


# ----------------------------------------------------------------------------------------- problem setup

def make_call(bucket: Bucket, N: int, T: int, H: int, HV: int, device: str, seed: int,
              with_state: bool = True, ragged: bool = False) -> dispatch.KDACall:
    """A KDACall of the bucket's op/dtype/dims with fresh random inputs (log-space gate, q/k L2 norm in
    kernel).  ``ragged`` makes varlen sequences of unequal lengths."""
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

    q, k, v = rand(B, total, H, K), rand(B, total, H, K), rand(B, total, HV, V)
    g = torch.nn.functional.logsigmoid(rand(B, total, HV, K) + 3.0)
    beta = torch.rand(B, total, HV, generator=gen)
    q, k, v, g, beta = (x.to(device=device, dtype=dtype) for x in (q, k, v, g, beta))
    state = (rand(N, HV, K, V) * 0.1).to(device=device, dtype=torch.float64 if dtype == torch.float64
                                          else torch.float32) if with_state else None
    problem = Problem(B=B, T=total, H=H, HV=HV, K=K, V=V, N=N, varlen=varlen, dtype=dtype,
                      device=torch.device(device))
    opts = KDAOptions(scale=K ** -0.5, use_qk_l2norm_in_kernel=True)
    return dispatch.KDACall(bucket.op, problem, opts, q, k, v, g, beta, state, cu_seqlens,
                            output_final_state=True)


def check_config(backend: dispatch.Backend, config: dict, call: dispatch.KDACall, tolerance: float) -> str | None:
    """Run one config on ``call`` and compare with the float64 reference; the reason it fails, or None."""
    try:
        o, state = backend.run(call, dict(config))
        if call.q.is_cuda:
            torch.cuda.synchronize()
    except Exception as exc:  # a crashing config is rejected, not fatal
        return f"crashed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    tensors = [x.double() if x is not None and x.is_floating_point() else x
               for x in (call.q, call.k, call.v, call.g, call.beta, call.initial_state)]
    ref_o, ref_state = kda_reference(*tensors, cu_seqlens=call.cu_seqlens, opts=call.opts,
                                     algorithm="recurrent" if call.op == "recurrent" else "chunk")
    for name, got, want in (("output", o, ref_o), ("final state", state, ref_state)):
        if got is None:
            return f"returned no {name}"
        if got.shape != want.shape:
            return f"{name} has shape {list(got.shape)}, expected {list(want.shape)}"
        err = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
        if not err <= tolerance:  # also catches NaN
            return f"{name} relative error {err:.2e} > {tolerance:.0e}"
    return None


def time_config(backend: dispatch.Backend, config: dict, call: dispatch.KDACall) -> float:
    """Median milliseconds of one call (CUDA: triton.testing.do_bench; CPU: wall clock)."""
    fn = lambda: backend.run(call, dict(config))  # noqa: E731
    if call.q.is_cuda:
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

def _candidates(backend: dispatch.Backend, call: dispatch.KDACall) -> list[dict]:
    """The backend's search space with its default config first (so a short --max-configs or time budget
    still measures the config the dispatch would otherwise use), without duplicates."""
    default = backend.default_config(call)
    out = [default]
    for config in backend.configs(call):
        if config not in out:
            out.append(config)
    return out


def tune(shapes: list[TuneShape], device: str, backends: list[str] | None = None, budget_s: float | None = None,
         force: bool = False, output=None, seed: int = 0, max_configs: int | None = None,
         log=print) -> dict:
    """Tune ``shapes``; returns {bucket key: winner record}.  Finished buckets are written to the table
    (``output`` path or the user's table) right away; buckets already there are skipped unless ``force``."""
    names = [b for b in dispatch.backends() if backends is None or b in backends]
    if backends:
        unknown = sorted(set(backends) - set(dispatch.backends()))
        if unknown:
            raise ValueError(f"--backends: {unknown} not registered here (registered: {dispatch.backends()})")
    identity = tuning_table.machine_identity(device)
    path = output or tuning_table.table_path(identity)
    existing = tuning_table._read(path) if path.exists() else None
    done = existing["entries"] if existing and existing["identity"] == identity else {}

    plan = []  # (shape, backend, [configs])
    for shape in shapes:
        if shape.bucket.key in done and not force:
            log(f"skip {shape.bucket.key}: already in {path} (use --force to re-measure)")
            continue
        call = make_call(shape.bucket, shape.N, shape.T, shape.H, shape.HV, device, seed)
        for name in names:
            backend = dispatch.get_backend(name)
            why_not = backend.supports(call)
            configs = _candidates(backend, call) if why_not is None else []
            plan.append((shape, backend, configs[:max_configs] if max_configs else configs, why_not))
    total = sum(max(1, len(configs)) for _, _, configs, _ in plan)
    step, close_progress = progress(total)
    started = time.perf_counter()
    results: dict[str, BucketResult] = {}
    finished: dict[str, dict] = {}
    out_of_time = False

    for index, (shape, backend, configs, why_not) in enumerate(plan):
        key = shape.bucket.key
        result = results.setdefault(key, BucketResult(shape.bucket, shape))
        if why_not is not None:
            result.skipped[backend.name] = why_not
            step(f"{key} {backend.name}: skipped: {why_not}")
        for number, config in enumerate(configs):
            if budget_s is not None and time.perf_counter() - started > budget_s:
                out_of_time = True
                break
            label = f"{backend.name} {config}"
            small = make_call(shape.bucket, 2, 2 * 64 + 37 if shape.bucket.op == "chunk" else
                              (1 if shape.bucket.length == "t1" else 3), shape.H, shape.HV, device, seed + 1,
                              ragged=True)
            reason = check_config(backend, config, small, TOLERANCE[shape.bucket.dtype])
            if reason:
                result.rejected[label] = reason
                step(f"{key} {backend.name} config {number + 1}/{len(configs)}: rejected ({reason[:60]})")
                continue
            try:
                call = make_call(shape.bucket, shape.N, shape.T, shape.H, shape.HV, device, seed)
                ms = time_config(backend, config, call)
            except Exception as exc:
                result.rejected[label] = f"crashed while timing: {type(exc).__name__}: {exc}"[:300]
                step(f"{key} {backend.name} config {number + 1}/{len(configs)}: crashed")
                continue
            result.timings.append((ms, backend.name, config))
            step(f"{key} {backend.name} config {number + 1}/{len(configs)}: {ms:.3f} ms")
        if out_of_time:
            break
        last_of_bucket = index + 1 == len(plan) or plan[index + 1][0].bucket.key != key
        if last_of_bucket:
            record = result.record()
            if record:
                tuning_table.write_entries({key: record}, identity, path)
                finished[key] = record
                skipped = "".join(f", {name} skipped: {why}" for name, why in result.skipped.items())
                log(f"{key}: {record['backend']} {record['config']} {record['time_ms']:.3f} ms "
                    f"({record['candidates']} candidates, {len(record['rejected'])} rejected{skipped}) -> {path}")
            else:
                log(f"{key}: no correct candidate; rejected: {result.rejected}; skipped: {result.skipped}")
    close_progress()
    if out_of_time:
        log(f"time budget of {budget_s:.0f} s used up: {len(finished)} bucket(s) finished and kept in {path}; "
            f"run again to resume")
    return finished


# ------------------------------------------------------------------------------------------------- CLI

def explain_table(shapes: list[TuneShape], device: str, log=print) -> None:
    """What dispatch would pick for each bucket's representative shape, and why."""
    identity = tuning_table.machine_identity(device)
    log(f"machine: {identity}")
    log(f"tuned table: {tuning_table.table_path(identity)}")
    for shape in shapes:
        call = make_call(shape.bucket, shape.N, min(shape.T, 256), shape.H, shape.HV, device, 0)
        if shape.bucket.op == "chunk" and shape.T > 256:  # classify by the real length, build small tensors
            call.problem = Problem(**{**call.problem.__dict__, "T": shape.T})
        log(f"{shape.bucket.key}:")
        log("  " + str(dispatch.choose(call)).replace("\n", "\n  "))


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv=None) -> int:
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
    parser.add_argument("--ops", default="chunk,recurrent", help="ops to tune (default: chunk,recurrent)")
    parser.add_argument("--dtypes", default="bf16", help="input dtypes: bf16,fp16,fp32,fp64 (default: bf16)")
    parser.add_argument("--dims", default="128", help="head dims K=V to tune (default: 128)")
    parser.add_argument("--bucket", action="append", default=[],
                        help="tune only this bucket key (repeatable), e.g. chunk/bf16/K128V128/T8k/dense")
    parser.add_argument("--backends", default=None, help="only these backends (default: all registered)")
    parser.add_argument("--budget", type=float, default=None, help="stop after this many seconds (resumable)")
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
        if op not in dispatch.OPS:
            parser.error(f"--ops: {op!r} is not one of {list(dispatch.OPS)}")
    shapes = default_tune_shapes(device, dtypes=dtypes, dims=dims, ops=ops)
    if args.bucket:
        try:
            wanted = [Bucket.parse(key) for key in args.bucket]
        except ValueError as exc:
            parser.error(f"--bucket: {exc}")
        by_key = {s.bucket.key: s for s in shapes}
        shapes = [by_key.get(b.key) or TuneShape(b, 2, 1024 if b.op == "chunk" else 1, 4, 4) for b in wanted]
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
    finished = tune(shapes, device, backends=_csv(args.backends) if args.backends else None, budget_s=args.budget,
                    force=args.force, output=output, seed=args.seed, max_configs=args.max_configs)
    print(f"done: {len(finished)} bucket(s) tuned", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
