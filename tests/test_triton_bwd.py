"""Triton chunkwise backward (kernels_triton/chunk_bwd.py) on the CPU through TRITON_INTERPRET=1.

Triton decides at kernel definition time whether a kernel is interpreted, so the kernels run in a subprocess:
this file, run as a script, is the worker (``python tests/test_triton_bwd.py CASE...`` prints one JSON line per
case).  Each case's gradients are compared with the float64 reference backward (kda_compile/reference_bwd.py)
and with autograd through the float64 reference, on the same (rounded) inputs; errors are
``||grad - ref|| / ||ref||``.  The worker fills the outputs the kernels leave uninitialised with NaN, so an element
a kernel fails to write shows up as a non-finite gradient.  Also: determinism (two calls bitwise equal), the
backward from a training forward's kept X and aqk (bitwise that of the recompute), causality of gradients, and
the products' TF32 rounding (emulated in the interpreter, gate.EMULATE_TF32).
The GPU cases (marked gpu) run the same cases compiled for the GPU (the worker with ``KDA_TEST_CUDA=1``: head dims
of at least 16, float32 with TF32 products), and the standard shapes in bf16.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("q", "k", "v", "g", "beta", "initial_state", "A_log", "dt_bias")
TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
GPU_F32_TOL = 3e-3   # float32 cases on a GPU run with TF32 products (see _worker): 5.7e-4 at most on the CPU
                     # with TF32 rounding emulated

# name -> case; fields as tests/test_chunk_bwd.case_inputs, plus dtype, op (grad | determinism | causal), tol
CASES = {
    "fp32_ragged_gva": dict(op="grad", dtype="float32", B=2, T=70, H=1, HV=2, K=16, V=8),
    "fp32_varlen_empty_one_token": dict(op="grad", dtype="float32", cu=[0, 5, 50, 50, 99, 100], H=1, HV=1, K=8,
                                        V=8),
    "fp32_c32_state_v_first": dict(op="grad", dtype="float32", B=1, T=45, H=2, HV=2, K=8, V=16, C=32,
                                   state_v_first=True),
    "fp32_gate_l2norm_sigmoid": dict(op="grad", dtype="float32", B=1, T=40, H=1, HV=2, K=32, V=8, gate="raw",
                                     l2norm=True, beta_logits=True),
    "fp32_safe_gate_neg_eig_c32": dict(op="grad", dtype="float32", B=1, T=33, H=2, HV=4, K=8, V=8, gate="raw",
                                       lower_bound=-5.0, beta_logits=True, neg_eig=True, C=32),
    "fp32_safe_gate_no_A_log": dict(op="grad", dtype="float32", B=2, T=20, H=1, HV=1, K=8, V=8, gate="raw",
                                    lower_bound=-3.0, drop_A_log=True),
    # gates of -1000: the float32 cumsum keeps ~6e-5 absolute, hence the looser bound (as the forward's test)
    "fp32_masked_gate": dict(op="grad", dtype="float32", B=1, T=70, H=1, HV=1, K=8, V=8, masked=True, tol=3e-4),
    # the exact-column path with the L2 norm in ragged chunks: scratch past a chunk's rows is NaN-filled (_worker)
    "fp32_varlen_l2_masked_c32": dict(op="grad", dtype="float32", cu=[0, 25, 60], H=1, HV=2, K=8, V=8, C=32,
                                      l2norm=True, masked=True, tol=3e-4),
    "fp32_no_state_no_dht_k128": dict(op="grad", dtype="float32", B=1, T=64, H=1, HV=1, K=128, V=32, h0=False,
                                      dht=False),
    "bf16_gva_prologue": dict(op="grad", dtype="bfloat16", B=1, T=70, H=1, HV=2, K=32, V=32, gate="raw",
                              l2norm=True, beta_logits=True),
    "bf16_varlen_safe_c32": dict(op="grad", dtype="bfloat16", cu=[0, 1, 40, 40, 90], H=2, HV=2, K=16, V=16, C=32,
                                 gate="raw", lower_bound=-5.0),
    "determinism_gva_gate": dict(op="determinism", dtype="float32", B=1, T=90, H=1, HV=2, K=16, V=16, gate="raw",
                                 l2norm=True),
    # loss on the outputs before p = 70 (inside a 16-row block); every input after p redrawn
    "causal_log": dict(op="causal", dtype="float32", B=1, T=150, H=1, HV=2, K=16, V=16, causal_at=70),
    "causal_safe_gate_l2": dict(op="causal", dtype="float32", B=1, T=150, H=1, HV=1, K=16, V=16, causal_at=70,
                                gate="raw", lower_bound=-5.0, l2norm=True, beta_logits=True),
    "causal_masked_c32": dict(op="causal", dtype="float32", B=1, T=100, H=1, HV=1, K=16, V=16, causal_at=37, C=32,
                              masked=True),
    # a training forward keeps X and aqk; the backward that reads them equals the one that recomputes them
    "kept_ragged_gva_state_v_first": dict(op="kept", dtype="float32", B=2, T=70, H=1, HV=2, K=16, V=8,
                                          state_v_first=True),
    "kept_varlen_empty_one_token": dict(op="kept", dtype="bfloat16", cu=[0, 5, 50, 50, 99, 100], H=1, HV=1, K=8,
                                        V=8),
    "kept_gate_l2norm_sigmoid": dict(op="kept", dtype="float32", B=1, T=40, H=1, HV=2, K=32, V=8, gate="raw",
                                     l2norm=True, beta_logits=True),
    "kept_safe_gate_neg_eig_c32": dict(op="kept", dtype="bfloat16", B=1, T=33, H=2, HV=4, K=8, V=8, gate="raw",
                                       lower_bound=-5.0, beta_logits=True, neg_eig=True, C=32),
    "kept_masked_gate": dict(op="kept", dtype="float32", B=1, T=70, H=1, HV=1, K=8, V=8, masked=True),
}

# run twice, with and without TF32 emulated in the interpreter's products (gate.EMULATE_TF32): the GPU rounds the
# float32 operands of "tf32" products, which float32 interpretation hides.  D = 128 and the safe gate in the kernel,
# as the GPU test at the standard shapes; a product fed a float32 operand where cancellation follows (kg in
# Gamma_C's gradient, once) raised dt_bias's error 2.5x here and dg's to 1.3-1.4e-2 on the GPU
TF32_CASES = {
    "bf16_tf32_l2_safe_d128": dict(op="refgrad", dtype="bfloat16", B=1, T=512, H=1, HV=1, K=128, V=128, gate="raw",
                                   lower_bound=-5.0, l2norm=True),
}
TF32_SLACK = 1.25   # largest growth of any gradient's error under the emulation


# ------------------------------------------------------------------------------------------------ worker

def _low_inputs(case, seed=0):
    """float64 case inputs rounded to the case's dtype (q, k, v, g, beta) or float32 (states, A_log, dt_bias),
    and the float64 copies of exactly those values."""
    from test_chunk_bwd import case_inputs
    on_gpu = os.environ.get("KDA_TEST_CUDA") == "1"
    if on_gpu:  # the GPU kernels take head dims of 16 and up (their products' smallest tile)
        case = {**case, "K": max(case["K"], 16), "V": max(case["V"], 16)}
    a, opts, do, dht = case_inputs(case, seed=seed)
    dtype = getattr(torch, case["dtype"])
    low = {}
    for n, x in a.items():
        if not x.is_floating_point():
            low[n] = x
        else:
            low[n] = x.to(dtype if n in ("q", "k", "v", "g", "beta") else torch.float32)
    if on_gpu:  # the GPU run of the cases: the same values, on the device
        low = {n: x.cuda() for n, x in low.items()}
        do, dht = do.cuda(), dht.cuda() if dht is not None else None
    ref = {n: x.double() if x.is_floating_point() else x for n, x in low.items()}
    return low, ref, opts, do, dht


def _triton_grads(low, opts, do, dht, dtype):
    from kda_compile.kernels_triton.chunk_bwd import chunk_kda_bwd
    args = [low.get(n) for n in ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "A_log", "dt_bias")]
    return chunk_kda_bwd(*args, opts, do.to(dtype), dht.float() if dht is not None else None)


def _kernel_and_reference(case):
    """``(got, want, ref, opts, do, dht)``: the Triton gradients of a case and the float64 reference backward's on
    the same rounded inputs (``ref``)."""
    from kda_compile.reference_bwd import kda_reference_bwd
    low, ref, opts, do, dht = _low_inputs(case)
    got = _triton_grads(low, opts, do, dht, getattr(torch, case["dtype"]))
    want = kda_reference_bwd(*(ref.get(n) for n in ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens",
                                                    "A_log", "dt_bias")), opts, do, dht)
    return got, want, ref, opts, do, dht


def _grad_errors(case):
    from kda_inputs import rel_err
    from test_chunk_bwd import autograd_grads
    got, want, ref, opts, do, dht = _kernel_and_reference(case)
    auto = autograd_grads(ref, opts, do, dht)
    out = {}
    for n, x, y, z in zip(NAMES, got, want, auto):
        if x is None or y is None:
            out[n] = None if x is None and y is None else "missing"
        elif not torch.isfinite(x.double()).all():
            out[n] = {"ref": float("inf"), "autograd": float("inf")}
        else:
            out[n] = {"ref": rel_err(x, y), "autograd": rel_err(x, z)}
    return out


def _ref_errors(case):
    """Relative error of each gradient against the float64 reference backward only (larger cases)."""
    from kda_inputs import rel_err
    got, want = _kernel_and_reference(case)[:2]
    return {n: None if x is None else rel_err(x, y) for n, x, y in zip(NAMES, got, want)}


def _determinism(case):
    low, _, opts, do, dht = _low_inputs(case)
    dtype = getattr(torch, case["dtype"])
    first, second = _triton_grads(low, opts, do, dht, dtype), _triton_grads(low, opts, do, dht, dtype)
    return {n: None if x is None else bool(torch.equal(x, y)) for n, x, y in zip(NAMES, first, second)}


def _kept(case):
    """The training forward's output with and without keeping X and aqk, and the backward from what it kept
    against the backward that recomputes them: ``{"o": equal, name: equal}``, bitwise."""
    from kda_compile.kernels_triton.chunk_bwd import chunk_kda_bwd
    from kda_compile.kernels_triton.chunk_fwd import chunk_kda_fwd
    low, _, opts, do, dht = _low_inputs(case)
    dtype = getattr(torch, case["dtype"])
    args = [low.get(n) for n in ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "A_log", "dt_bias")]
    o_plain, final_plain = chunk_kda_fwd(*args, opts, True)
    o, final, kept = chunk_kda_fwd(*args, opts, True, keep=True)
    cot = (do.to(dtype), dht.float() if dht is not None else None)
    recomputed = chunk_kda_bwd(*args, opts, *cot)
    from_kept = chunk_kda_bwd(*args, opts, *cot, kept=kept)
    out = {"o": bool(torch.equal(o, o_plain) and torch.equal(final, final_plain))}
    for n, x, y in zip(NAMES, recomputed, from_kept):
        out[n] = None if x is None else bool(torch.equal(x, y) and torch.isfinite(x).all())
    return out


def _causality(case):
    """For each input: (before p unchanged bit for bit, after p exactly zero in both runs)."""
    low, _, opts, do, _ = _low_inputs(case)
    dtype = getattr(torch, case["dtype"])
    cut = case["causal_at"]
    do = do.clone()
    do[:, cut:] = 0
    first = _triton_grads(low, opts, do, None, dtype)
    late = dict(low)
    gen = torch.Generator().manual_seed(7)
    for n in ("q", "k", "v", "g", "beta"):
        x = low[n].clone()
        noise = torch.randn(x[:, cut:].shape, generator=gen).to(x.device, x.dtype)
        x[:, cut:] = -noise.abs() if n == "g" and case.get("gate", "log") == "log" else noise
        late[n] = x
    second = _triton_grads(late, opts, do, None, dtype)
    out = {}
    for n, x, y in zip(NAMES, first, second):
        if x is None:
            out[n] = None
        elif n in ("q", "k", "v", "g", "beta"):
            out[n] = [bool(torch.equal(x[:, :cut], y[:, :cut])),
                      bool((x[:, cut:] == 0).all() and (y[:, cut:] == 0).all())]
        else:  # initial state, A_log, dt_bias: see only exact zeros from the later tokens
            out[n] = [bool(torch.equal(x, y)), True]
    return out


def _gpu_refusal(case) -> str | None:
    """Why the dispatch keeps the case from the Triton backward on this GPU (None: it runs there), as for a call
    that names ``backend="triton"``."""
    from kda_compile import dispatch
    from kda_compile.checks import check_inputs
    from kda_compile.kernels_triton.backend import TRITON_BACKEND
    low, _, opts, _, _ = _low_inputs(case)
    problem = check_inputs(low["q"], low["k"], low["v"], low["g"], low["beta"], initial_state=low.get("initial_state"),
                           cu_seqlens=low.get("cu_seqlens"), A_log=low.get("A_log"), dt_bias=low.get("dt_bias"),
                           use_gate_in_kernel=opts.use_gate_in_kernel,
                           use_beta_sigmoid_in_kernel=opts.use_beta_sigmoid_in_kernel,
                           allow_neg_eigval=opts.allow_neg_eigval, lower_bound=opts.lower_bound,
                           chunk_size=opts.chunk_size, state_v_first=opts.state_v_first)
    call = dispatch.KDACall("chunk", problem, opts, low["q"], low["k"], low["v"], low["g"], low["beta"],
                            low.get("initial_state"), low.get("cu_seqlens"), low.get("A_log"), low.get("dt_bias"))
    return dispatch.backward_reason(TRITON_BACKEND, call, forced=True)


def _worker(names):
    from kda_compile.kernels_triton import chunk_bwd_solve
    chunk_bwd_solve.new_output = lambda *shape, device, dtype=torch.float32: torch.full(shape, float("nan"),
                                                                                           device=device, dtype=dtype)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if os.environ.get("KDA_TEST_CUDA") == "1":  # float32 under 'highest' goes to another backend on a GPU
        torch.set_float32_matmul_precision("high")
    if os.environ.get("KDA_CHECK_TRITON_BOUNDS") == "1" and os.environ.get("TRITON_INTERPRET") == "1":
        from triton_bounds import checked_accesses   # conftest.py: the sweep reaches the worker processes too
        checked_accesses().__enter__()
    for name in names:
        case = {**CASES, **TF32_CASES}[name]
        run = {"grad": _grad_errors, "determinism": _determinism, "causal": _causality,
               "refgrad": _ref_errors, "kept": _kept}[case["op"]]
        refused = _gpu_refusal(case) if os.environ.get("KDA_TEST_CUDA") == "1" else None
        print(json.dumps({name: {"refused": refused} if refused else run(case)}), flush=True)


# ------------------------------------------------------------------------------------------------ tests

def _run_worker(names, jobs: int = 1, **env_extra) -> dict:
    """Run the cases in ``jobs`` subprocesses at once (each compiles its kernels once), interpreted unless
    ``env_extra`` says otherwise; ``{name: result}``."""
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **{"TRITON_INTERPRET": "1", **env_extra})
    parts = [names[i::jobs] for i in range(jobs) if names[i::jobs]]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *part], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for part in parts]
    out, errors = {}, []
    for part, proc in zip(parts, procs):
        try:
            stdout, stderr = proc.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        got = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        for result in got:
            out.update(result)
        if proc.returncode != 0 and len(got) < len(part):
            errors.append(stderr[-4000:])
    if errors:
        pytest.fail("worker failed:\n" + "\n".join(errors))
    return out


@pytest.fixture(scope="module")
def results():
    return _run_worker(list(CASES))


@pytest.fixture(scope="module")
def gpu_results():
    """The cases run by the GPU's compiled kernels (float32 cases with TF32 products: see _worker), in worker
    processes sharing the CPUs with pytest-xdist's (each xdist worker computes this fixture once)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    jobs = max(1, min(8, (os.cpu_count() or 1) // workers))
    return _run_worker(list(CASES), jobs=jobs, TRITON_INTERPRET="0", KDA_TEST_CUDA="1")


@pytest.fixture(scope="module")
def tf32_results():
    """``(plain, emulated)``: the TF32 cases interpreted in float32, then with TF32 products emulated."""
    return _run_worker(list(TF32_CASES), KDA_TRITON_EMULATE_TF32="0"), \
        _run_worker(list(TF32_CASES), KDA_TRITON_EMULATE_TF32="1")


def _check_gradients(name, result, gpu=False):
    case = CASES[name]
    tol = case.get("tol", TOL[case["dtype"]])
    if gpu and case["dtype"] == "float32":  # TF32 products there: the GPU bound of the standard shapes
        tol = max(tol, GPU_F32_TOL)
    for n, err in result.items():
        assert err != "missing", f"{name}: gradient of {n} missing or unexpected"
        if err is None:
            continue
        assert err["ref"] < tol and err["autograd"] < tol, f"{name} d{n}: {err} (tol {tol})"


def _check_deterministic(name, result):
    for n, same in result.items():
        assert same is None or same, f"{name}: d{n} differs between two calls"


def _check_causal(name, result):
    for n, (unchanged, zero_after) in ((n, r) for n, r in result.items() if r is not None):
        assert unchanged, f"{name}: d{n} before p changed when later inputs changed"
        assert zero_after, f"{name}: d{n} after p is not exactly zero"


def _check_kept(name, result):
    """Keeping X and aqk leaves the forward's output unchanged, and the backward that reads them gives the same
    gradients, bit for bit, as the one that forms them again."""
    for n, same in result.items():
        assert same is None or same, f"{name}: {'the output' if n == 'o' else 'd' + n} differs with X and aqk kept"


CHECKS = {"grad": _check_gradients, "determinism": _check_deterministic, "causal": _check_causal, "kept": _check_kept}


@pytest.mark.parametrize("name", list(CASES))
def test_triton_bwd_case(results, name):
    """Each case in the interpreter: gradients against the float64 references, determinism, causality, or the
    backward from a training forward's kept tensors."""
    assert name in results, f"{name}: no result from the worker"
    CHECKS[CASES[name]["op"]](name, results[name])


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_triton_bwd_case_gpu(gpu_results, name):
    """The same cases with the kernels compiled for the GPU, head dims raised to 16 and float32 with TF32 products
    (ragged chunks, varlen, GVA and each prologue flag, which the standard shapes do not reach; float32-accurate
    products ran into an illegal address there, so the dispatch refuses them: test_ops)."""
    assert name in gpu_results, f"{name}: no result from the worker"
    if "refused" in gpu_results[name]:
        pytest.skip(f"the dispatch does not give this case to the Triton backward on a GPU: "
                    f"{gpu_results[name]['refused']}")
    op = CASES[name]["op"]
    if op == "grad":
        _check_gradients(name, gpu_results[name], gpu=True)
    else:
        CHECKS[op](name, gpu_results[name])


@pytest.mark.parametrize("name", list(TF32_CASES))
def test_triton_bwd_tf32_rounding(tf32_results, name):
    """No gradient's error may grow by more than TF32_SLACK when the products round their operands as a GPU does."""
    plain, emulated = tf32_results[0][name], tf32_results[1][name]
    present = [n for n in NAMES if plain[n] is not None]
    assert present and all(emulated[n] is not None for n in present), (plain, emulated)
    assert any(plain[n] != emulated[n] for n in present), "the emulation changed nothing: is it active?"
    for n in present:
        assert emulated[n] <= TF32_SLACK * plain[n] + 1e-4, \
            f"{name} d{n}: {emulated[n]:.2e} with TF32 products against {plain[n]:.2e} in float32"


# ------------------------------------------------------------------------------------------------ GPU

GPU_SHAPES = [(2, 8192, 16), (1, 32768, 16), (8, 4096, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("setting", ["prenorm_log", "l2norm_safe_gate"])
@pytest.mark.parametrize("B,T,H", GPU_SHAPES)
def test_triton_bwd_gpu_standard_shapes(B, T, H, setting):
    """bf16 at the standard shapes (D = 128): every gradient within 1e-2 of the float64 reference backward."""
    from kda_compile.kernels_triton.chunk_bwd import chunk_kda_bwd
    from kda_compile.reference import KDAOptions, l2_normalize
    from kda_compile.reference_bwd import kda_reference_bwd
    from kda_inputs import make_inputs, rel_err
    safe = setting == "l2norm_safe_gate"
    a = make_inputs(B=B, T=T, H=H, K=128, V=128, dtype=torch.float64, device="cuda", gate="raw" if safe else "log",
                    seed=0)
    if not safe:
        a["q"], a["k"] = l2_normalize(a["q"]), l2_normalize(a["k"])
    opts = KDAOptions(scale=128 ** -0.5, use_qk_l2norm_in_kernel=safe, use_gate_in_kernel=safe,
                      lower_bound=-5.0 if safe else None)
    low = {n: x.to(torch.bfloat16 if n in ("q", "k", "v", "g", "beta") else torch.float32) for n, x in a.items()}
    gen = torch.Generator(device="cuda").manual_seed(1)
    do = torch.randn(a["v"].shape, generator=gen, device="cuda", dtype=torch.float64)
    dht = torch.randn(a["initial_state"].shape, generator=gen, device="cuda", dtype=torch.float64)
    args = [low.get(n) for n in ("q", "k", "v", "g", "beta", "initial_state")]
    got = chunk_kda_bwd(*args, None, low.get("A_log"), low.get("dt_bias"), opts, do.bfloat16(), dht.float())
    ref = {n: x.double() for n, x in low.items()}
    want = kda_reference_bwd(*(ref.get(n) for n in ("q", "k", "v", "g", "beta", "initial_state")), None,
                             ref.get("A_log"), ref.get("dt_bias"), opts, do, dht)
    for n, x, y in zip(NAMES, got, want):
        assert (x is None) == (y is None), n
        if x is not None:
            assert rel_err(x, y) <= 1e-2, f"d{n}: {rel_err(x, y):.2e}"


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    _worker(sys.argv[1:])
