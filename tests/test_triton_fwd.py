"""Triton backend (kernels_triton/) against the float64 reference, on the CPU through TRITON_INTERPRET=1.

Triton decides at kernel definition time whether a kernel is interpreted, and other test files may already
have imported the kernels for a GPU, so the kernels run in a subprocess: this file, run as a script, is the
worker (``python tests/test_triton_fwd.py CASE...`` prints one JSON line of errors per case).  Two workers run
side by side (chunk cases and decode cases); each test asserts on its case's errors.  The same cases run on
a GPU, at larger sizes, in tests/test_triton_gpu.py.

Every error is ``||out - ref|| / ||ref||`` against the float64 recurrence on fresh random inputs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = {"float32": 2e-5, "float16": 1e-2, "bfloat16": 3e-2}   # interpreter: fp32 dots are exact float32

# name -> case.  op: chunk | states | recurrent | pool | spec.  Fields map to tests/kda_inputs.make_inputs and the API.
CASES = {
    # chunk form: ragged T, state in/out, grouped value heads, varlen with an empty and a 1-token sequence
    "chunk_fp32_ragged_gva": dict(op="chunk", dtype="float32", B=2, T=70, H=1, HV=2, K=32, V=32),
    "chunk_bf16_varlen_prologue": dict(op="chunk", dtype="bfloat16", cu=[0, 5, 50, 50, 99, 100], H=1, HV=2, K=32,
                                       V=32, gate="raw", l2norm=True, beta_logits=True),
    "chunk_fp16_c32_vfirst_safe": dict(op="chunk", dtype="float16", B=1, T=45, H=2, HV=2, K=64, V=32, C=32,
                                       gate="raw", lower_bound=-5.0, state_v_first=True, l2norm=True),
    "chunk_fp32_lb_noA_negeig": dict(op="chunk", dtype="float32", B=1, T=20, H=1, HV=1, K=16, V=16, gate="raw",
                                     lower_bound=-3.0, drop_A_log=True, beta_logits=True, neg_eig=True),
    # strong decay (|Gamma - ref| near SPAN_MAX = 60): factored path with large factors, or element-wise
    "chunk_fp32_strong_gate": dict(op="chunk", dtype="float32", B=1, T=100, H=1, HV=1, K=16, V=16, gscale=20.0,
                                   tol=1e-4),
    # the other organisation of the intra-chunk kernel (config space), element-wise diagonal path included
    "chunk_fp32_fused_intra": dict(op="chunk", dtype="float32", cu=[0, 20, 83], H=1, HV=2, K=32, V=32, gscale=30.0,
                                   config={"intra_impl": "fused", "intra_BK": 16}),
    "chunk_fp32_k64_noh0": dict(op="chunk", dtype="float32", B=1, T=130, H=2, HV=4, K=64, V=64, h0=False),
    "chunk_bf16_k128": dict(op="chunk", dtype="bfloat16", B=1, T=40, H=1, HV=1, K=128, V=128, l2norm=True),
    # Gamma ~ -1000 after a masked token: float32 cumsum keeps ~6e-5 absolute, hence the looser bound
    "chunk_fp32_masked_gate": dict(op="chunk", dtype="float32", B=1, T=40, H=1, HV=1, K=16, V=16, masked=True,
                                   tol=3e-4),
    # state entering each chunk (return_intermediate_states), equal-length and varlen
    "states_fp32_batch": dict(op="states", dtype="float32", B=2, T=70, H=1, HV=2, K=16, V=32),
    "states_bf16_varlen_vfirst": dict(op="states", dtype="bfloat16", cu=[0, 30, 100, 101], H=1, HV=1, K=32, V=16,
                                      state_v_first=True),
    # third organisation of the intra-chunk stage (three kernels; A by 16-row block, each block its own path).
    # Listed after the cases above: the chunk worker draws every case's inputs from one seeded stream.
    "chunk_fp32_split_ragged_gva": dict(op="chunk", dtype="float32", B=2, T=70, H=1, HV=2, K=32, V=32,
                                        config={"intra_impl": "split", "intra_BK": 16, "intra_a_BK": 32}),
    # gscale 30: row blocks of one chunk take different paths (factored and exact fallback)
    "chunk_fp32_split_strong_gate": dict(op="chunk", dtype="float32", cu=[0, 20, 83], H=1, HV=2, K=16, V=16,
                                         gscale=30.0, tol=1e-4, config={"intra_impl": "split"}),
    "chunk_fp32_split_masked_gate": dict(op="chunk", dtype="float32", B=1, T=40, H=1, HV=1, K=16, V=16, masked=True,
                                         tol=3e-4, config={"intra_impl": "split"}),
    "chunk_bf16_split_varlen_prologue": dict(op="chunk", dtype="bfloat16", cu=[0, 5, 50, 50, 99, 100], H=1, HV=2,
                                             K=32, V=32, gate="raw", l2norm=True, beta_logits=True,
                                             config={"intra_impl": "split"}),
    "chunk_fp32_split_c32_safe": dict(op="chunk", dtype="float32", B=1, T=45, H=2, HV=2, K=16, V=32, C=32,
                                      gate="raw", lower_bound=-5.0, l2norm=True, config={"intra_impl": "split"}),
    # fourth organisation ("split" with qg, kg and k r_k exp(Gamma) written by the A kernel)
    "chunk_fp32_split2_ragged_gva": dict(op="chunk", dtype="float32", B=2, T=70, H=1, HV=2, K=32, V=32,
                                         config={"intra_impl": "split2", "intra_BK": 16, "intra_a_BK": 32}),
    "chunk_fp32_split2_strong_gate": dict(op="chunk", dtype="float32", cu=[0, 20, 83], H=1, HV=2, K=16, V=16,
                                          gscale=30.0, tol=1e-4, config={"intra_impl": "split2"}),
    "chunk_fp32_split2_masked_gate": dict(op="chunk", dtype="float32", B=1, T=40, H=1, HV=1, K=16, V=16,
                                          masked=True, tol=3e-4, config={"intra_impl": "split2"}),
    "chunk_bf16_split2_varlen_prologue": dict(op="chunk", dtype="bfloat16", cu=[0, 5, 50, 50, 99, 100], H=1, HV=2,
                                              K=32, V=32, gate="raw", l2norm=True, beta_logits=True,
                                              config={"intra_impl": "split2"}),
    "chunk_fp16_split2_c32_safe_vfirst": dict(op="chunk", dtype="float16", B=1, T=45, H=1, HV=2, K=64, V=32, C=32,
                                              gate="raw", lower_bound=-5.0, l2norm=True, state_v_first=True,
                                              config={"intra_impl": "split2", "intra_a_BK": 32}),
    "chunk_fp32_split2_outputs_main_strong": dict(op="chunk", dtype="float32", cu=[0, 20, 83], H=1, HV=2, K=32,
                                                  V=16, gscale=30.0, tol=1e-4,
                                                  config={"intra_impl": "split2", "intra_a_outputs": "main"}),
    "chunk_fp32_split2_norms_prep_masked": dict(op="chunk", dtype="float32", B=1, T=70, H=1, HV=2, K=32, V=16,
                                                masked=True, l2norm=True, tol=3e-4,
                                                config={"intra_impl": "split2", "intra_norms": "prep"}),
    # the one-program organisation ("rows"; the default before "split"), factored and element-wise paths
    "chunk_fp32_rows_strong_gate": dict(op="chunk", dtype="float32", cu=[0, 20, 83], H=1, HV=2, K=32, V=16,
                                        gscale=30.0, tol=1e-4, config={"intra_impl": "rows"}),
    # fifth organisation ("split3": A tiles factored around each block's first row, rows checked one by one)
    "chunk_fp32_split3_ragged_gva": dict(op="chunk", dtype="float32", B=2, T=70, H=1, HV=2, K=32, V=32,
                                         config={"intra_impl": "split3", "intra_BK": 16}),
    "chunk_fp32_split3_strong_gate": dict(op="chunk", dtype="float32", cu=[0, 20, 83], H=1, HV=2, K=16, V=16,
                                          gscale=30.0, tol=1e-4, config={"intra_impl": "split3"}),
    "chunk_fp32_split3_masked_gate_l2": dict(op="chunk", dtype="float32", B=1, T=70, H=1, HV=2, K=32, V=16,
                                             masked=True, l2norm=True, tol=3e-4, config={"intra_impl": "split3"}),
    "chunk_fp16_split3_c32_safe_vfirst": dict(op="chunk", dtype="float16", B=1, T=45, H=1, HV=2, K=64, V=32, C=32,
                                              gate="raw", lower_bound=-5.0, state_v_first=True, l2norm=True,
                                              config={"intra_impl": "split3"}),
    "chunk_fp32_split3_lb_noA_negeig": dict(op="chunk", dtype="float32", B=1, T=20, H=1, HV=1, K=16, V=16,
                                            gate="raw", lower_bound=-3.0, drop_A_log=True, beta_logits=True,
                                            neg_eig=True, config={"intra_impl": "split3"}),
    # causality, bit for bit: redraw every input after token 70 (inside a 16-row block), the first 70 outputs
    # must not move (float32, so no output rounding hides a leak); log, safe and strongly decaying gates
    "causal_fp32_split3_log": dict(op="causal", dtype="float32", B=1, T=150, H=1, HV=1, K=32, V=32, causal_at=70,
                                   config={"intra_impl": "split3"}),
    "causal_fp32_split3_safe": dict(op="causal", dtype="float32", B=1, T=150, H=1, HV=1, K=32, V=32, causal_at=70,
                                    gate="raw", lower_bound=-5.0, l2norm=True, config={"intra_impl": "split3"}),
    "causal_fp32_split3_strong": dict(op="causal", dtype="float32", B=1, T=150, H=1, HV=1, K=16, V=16,
                                      causal_at=75, gscale=30.0, config={"intra_impl": "split3"}),
    # the inverse's diagonal blocks by products (solve_diag): C = 64 (three-product branch) and C = 32
    # split3 with the norm factors of every row it uses taken in one pass before the rest (intra_a_norms="first")
    "chunk_fp32_split3_norms_first_ragged": dict(op="chunk", dtype="float32", cu=[0, 20, 83], H=1, HV=2, K=32, V=16,
                                                 l2norm=True, masked=True, tol=3e-4,
                                                 config={"intra_impl": "split3", "intra_a_norms": "first",
                                                         "intra_a_row_BK": 16}),
    "chunk_fp32_split3_diag_products_negeig": dict(op="chunk", dtype="float32", B=1, T=70, H=1, HV=2, K=32, V=16,
                                                   gate="raw", lower_bound=-5.0, neg_eig=True, beta_logits=True,
                                                   config={"intra_impl": "split3", "solve_diag": "tf32x3"}),
    "chunk_fp32_split2_diag_products_c32": dict(op="chunk", dtype="float32", B=2, T=45, H=1, HV=1, K=16, V=16, C=32,
                                                config={"intra_impl": "split2", "solve_diag": "ieee"}),
    # the shipped default configuration is causal bit for bit too
    "causal_fp32_default_log": dict(op="causal", dtype="float32", B=1, T=150, H=1, HV=2, K=32, V=32, causal_at=70),
    # decode kernel
    "rec_bf16_decode_prologue": dict(op="recurrent", dtype="bfloat16", B=4, T=1, H=2, HV=4, K=64, V=64,
                                     gate="raw", l2norm=True, beta_logits=True),
    "rec_fp32_varlen_vfirst": dict(op="recurrent", dtype="float32", cu=[0, 3, 3, 9], H=1, HV=1, K=32, V=16,
                                   state_v_first=True, gate="raw", lower_bound=-5.0),
    "rec_fp16_k128": dict(op="recurrent", dtype="float16", B=2, T=3, H=1, HV=1, K=128, V=128, l2norm=True),
    "pool_fp32_inplace": dict(op="pool", dtype="float32", B=3, T=2, H=1, HV=2, K=32, V=32, inplace=True),
    "pool_bf16_out": dict(op="pool", dtype="bfloat16", B=3, T=1, H=1, HV=1, K=32, V=32, inplace=False),
    "spec_fp32_inplace": dict(op="spec", dtype="float32", cu=[0, 3, 5, 6], H=1, HV=2, K=16, V=16, inplace=True),
}
CHUNK_CASES = [name for name, case in CASES.items() if case["op"] in ("chunk", "states", "causal")]
DECODE_CASES = [name for name in CASES if name not in CHUNK_CASES]


# ------------------------------------------------------------------------------------------------ worker

def _inputs(case, device):
    from kda_inputs import make_inputs
    dtype = getattr(torch, case["dtype"])
    a = make_inputs(B=case.get("B", 1), T=case.get("T", 1), H=case["H"], HV=case["HV"], K=case["K"], V=case["V"],
                    dtype=torch.float64, gate=case.get("gate", "log"), beta_logits=case.get("beta_logits", False),
                    initial_state=case.get("h0", True), cu_seqlens=case.get("cu"),
                    state_v_first=case.get("state_v_first", False))
    if case.get("drop_A_log"):
        a.pop("A_log")
    if case.get("gscale"):
        a["g"] = a["g"] * case["gscale"]
    if case.get("masked"):  # gates as low as -1000 (masked positions) must stay finite
        g = a["g"].clone()
        g[:, 7] = -1000.0
        g[:, 20:23, :, ::2] = -1000.0
        a["g"] = g
    ref = {name: x.clone() for name, x in a.items()}
    low = {}
    for name, x in a.items():
        if name == "cu_seqlens":
            low[name] = x.to(device)
        elif name in ("q", "k", "v"):
            low[name] = x.to(device=device, dtype=dtype)
        elif name in ("initial_state", "A_log", "dt_bias"):
            low[name] = x.to(device=device, dtype=torch.float32)
        else:
            low[name] = x.to(device=device, dtype=dtype)
    # the reference sees exactly the rounded inputs
    for name, x in low.items():
        ref[name] = x.cpu().double() if x.is_floating_point() else x.cpu()
    return low, ref


def _flags(case):
    kw = dict(use_qk_l2norm_in_kernel=case.get("l2norm", False), use_gate_in_kernel=case.get("gate") == "raw",
              use_beta_sigmoid_in_kernel=case.get("beta_logits", False), allow_neg_eigval=case.get("neg_eig", False),
              state_v_first=case.get("state_v_first", False))
    if case.get("lower_bound") is not None:
        kw["lower_bound"] = case["lower_bound"]
    return kw


def _err(out, ref):
    from kda_inputs import rel_err
    out = out.detach().cpu().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return rel_err(out, ref.double())


def _causal_leak(case, low, kw, backend):
    """Largest ``|o - o'|`` over tokens before ``case["causal_at"]``, where o' is the output after every input of
    the later tokens (q, k, v, g, beta) is redrawn; causality means exactly 0 (design.md section 6)."""
    from kda_compile import chunk_kda
    cut = case["causal_at"]
    late = {}
    for name in ("q", "k", "v", "g", "beta"):
        x = low[name].clone()
        x[:, cut:] = torch.randn_like(x[:, cut:].float()).to(x.dtype) * (0.5 if name == "g" else 1.0)
        if name == "g" and case.get("gate", "log") == "log":
            x[:, cut:] = -x[:, cut:].float().abs().to(x.dtype)  # log decay stays <= 0
        late[name] = x
    config = case.get("config")

    def forward(inputs):
        if config:  # a non-default kernel config, straight to the backend
            from kda_compile.api import _options
            from kda_compile.kernels_triton.chunk_fwd import chunk_kda_fwd
            opts = _options(inputs["q"], None, kw["use_qk_l2norm_in_kernel"], kw["use_gate_in_kernel"],
                            kw["use_beta_sigmoid_in_kernel"], kw["allow_neg_eigval"], kw.get("lower_bound"),
                            case.get("C", 64), kw["state_v_first"])
            return chunk_kda_fwd(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
                                 inputs.get("initial_state"), None, inputs.get("A_log"), inputs.get("dt_bias"), opts,
                                 False, config)[0]
        return chunk_kda(**inputs, **kw, chunk_size=case.get("C", 64), backend=backend)[0]

    o_early = forward(low)[:, :cut]
    o_late = forward({**low, **late})[:, :cut]
    return float((o_early.double() - o_late.double()).abs().max())


def run_case(case, device="cpu", backend="triton"):
    """Run one case on ``backend`` and the float64 reference; returns ``{quantity: relative error}`` (and
    ``leak``, see :func:`_causal_leak`, for the causality cases)."""
    from kda_compile import chunk_kda, fused_recurrent_kda
    low, ref = _inputs(case, device)
    kw = _flags(case)
    if case["op"] == "causal":
        return {"leak": _causal_leak(case, low, kw, backend)}
    if case["op"] == "chunk" and case.get("config"):  # a non-default kernel config, straight to the backend
        from kda_compile.api import _options
        from kda_compile.kernels_triton.chunk_fwd import chunk_kda_fwd
        opts = _options(low["q"], None, kw["use_qk_l2norm_in_kernel"], kw["use_gate_in_kernel"],
                        kw["use_beta_sigmoid_in_kernel"], kw["allow_neg_eigval"], kw.get("lower_bound"),
                        case.get("C", 64), kw["state_v_first"])
        o, s = chunk_kda_fwd(low["q"], low["k"], low["v"], low["g"], low["beta"], low.get("initial_state"),
                             low.get("cu_seqlens"), low.get("A_log"), low.get("dt_bias"), opts, True, case["config"])
        ro, rs = fused_recurrent_kda(**ref, **kw, output_final_state=True, backend="reference")
        return {"o": _err(o, ro), "state": _err(s, rs)}
    if case["op"] == "states":
        from kda_compile.api import _options
        from kda_compile.kernels_triton.chunk_fwd import chunk_kda_fwd
        from kda_compile.reference import kda_reference_chunk_states
        opts = _options(low["q"], None, False, False, False, False, None, 64, kw["state_v_first"])
        names = ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens")
        o, s, h = chunk_kda_fwd(*[low.get(n) for n in names], None, None, opts, True, return_states=True)
        ro, rs, rh = kda_reference_chunk_states(*[ref.get(n) for n in names], None, None, opts)
        assert h.shape == rh.shape, (h.shape, rh.shape)
        return {"o": _err(o, ro), "state": _err(s, rs), "h": _err(h, rh)}
    if case["op"] == "chunk":
        o, s = chunk_kda(**low, **kw, chunk_size=case.get("C", 64), output_final_state=True, backend=backend)
        ro, rs = fused_recurrent_kda(**ref, **kw, output_final_state=True, backend="reference")
        return {"o": _err(o, ro), "state": _err(s, rs)}
    if case["op"] == "recurrent":
        o, s = fused_recurrent_kda(**low, **kw, output_final_state=True, backend=backend)
        ro, rs = fused_recurrent_kda(**ref, **kw, output_final_state=True, backend="reference")
        return {"o": _err(o, ro), "state": _err(s, rs)}
    # state pool: sequences read slots of a larger pool (continuous batching / speculative decoding)
    N = low["initial_state"].shape[0]
    P = 3 * N + 2
    gen = torch.Generator().manual_seed(1)
    pool64 = torch.randn(P, *low["initial_state"].shape[1:], generator=gen, dtype=torch.float64) * 0.5
    if case["op"] == "pool":
        idx = torch.randperm(P, generator=gen)[:N]
        extra = {}
    else:  # 2-D indices, one slot per draft token, initial state from column num_accepted_tokens - 1
        S = 3
        idx = torch.randperm(P, generator=gen)[:N * S].view(N, S)
        extra = {"num_accepted_tokens": torch.randint(1, S + 1, (N,), generator=gen)}
    pool = pool64.float().to(device)
    pool_ref = pool.cpu().double()
    low = {**low, "initial_state": pool, "ssm_state_indices": idx.to(device),
           **{n: x.to(device) for n, x in extra.items()}}
    ref = {**ref, "initial_state": pool_ref, "ssm_state_indices": idx, **extra}
    inplace = case["inplace"]
    o, s = fused_recurrent_kda(**low, **kw, output_final_state=not inplace, inplace_final_state=inplace,
                               backend=backend)
    ro, rs = fused_recurrent_kda(**ref, **kw, output_final_state=not inplace, inplace_final_state=inplace,
                                 backend="reference")
    out = {"o": _err(o, ro), "pool": _err(pool, pool_ref)}
    if not inplace:
        out["state"] = _err(s, rs)
    return out


def _worker(names):
    sys.path.insert(0, HERE)
    torch.manual_seed(0)
    for name in names:
        try:
            result = run_case(CASES[name])
        except Exception as exc:  # reported, and the test of this case fails with it
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({"case": name, **result}), flush=True)


# ------------------------------------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def results():
    """Run every case in two interpreter subprocesses (chunk, decode) at once; ``{case: errors}``."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("KDA_COMPILE_BACKEND", None)
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *names], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for names in (CHUNK_CASES, DECODE_CASES)]
    found, errors = {}, []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        for line in out.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                found[row.pop("case")] = row
        if proc.returncode:
            errors.append(err[-3000:])
    found["_stderr"] = "\n".join(errors)
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreter_matches_float64_reference(results, name):
    assert name in results, f"worker produced no result for {name}:\n{results['_stderr']}"
    row = results[name]
    assert "error" not in row, row.get("error")
    tol = CASES[name].get("tol", TOL[CASES[name]["dtype"]])
    for quantity, err in row.items():
        if quantity == "leak":  # causality is exact
            assert err == 0.0, f"{name}: earlier outputs moved by {err:.3g} when only later inputs changed"
        else:
            assert err <= tol, f"{name}: {quantity} relative error {err:.3g} > {tol:g}"


def _call(op="chunk", device="cpu", dtype=torch.float32, K=32, V=32, initial_state=None, inplace=False):
    from kda_compile.checks import Problem
    from kda_compile.dispatch import KDACall
    from kda_compile.reference import KDAOptions
    q = torch.zeros(1, 4, 1, K, dtype=dtype)
    v = torch.zeros(1, 4, 1, V, dtype=dtype)
    problem = Problem(1, 4, 1, 1, K, V, 1, False, dtype, torch.device(device))
    return KDACall(op, problem, KDAOptions(scale=1.0), q, q, v, q, q[..., 0], initial_state,
                   inplace_final_state=inplace)


def _backend():
    pytest.importorskip("triton")
    from kda_compile import dispatch
    return dispatch.get_backend("triton")  # raises (with the import error) if triton is installed but it broke


@pytest.mark.parametrize("kwargs, needle", [
    (dict(device="meta"), "meta"),
    (dict(device="cuda", dtype=torch.float64), "float64"),
    (dict(device="cuda", K=96), "K=96"),
    (dict(device="cuda", op="recurrent", V=512), "V=512"),
    (dict(device="cuda", initial_state=torch.zeros(1, 1, 32, 32, dtype=torch.float64)), "float32"),
    (dict(device="cuda", op="recurrent", inplace=True, initial_state=torch.zeros(1, 1, 32, 32).transpose(-1, -2)),
     "contiguous"),
])
def test_supports_names_the_reason(kwargs, needle):
    reason = _backend().supports(_call(**kwargs))
    assert reason is not None and needle in reason


def test_supports_accepts_standard_gpu_call():
    assert _backend().supports(_call(device="cuda", K=128, V=128, dtype=torch.bfloat16)) is None


def test_cpu_without_interpreter_falls_back_to_reference():
    from kda_compile import explain
    from kda_inputs import make_inputs
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    _backend()
    a = make_inputs(B=1, T=5, H=1, K=16, V=16, dtype=torch.float32)
    choice = explain(**a)
    assert choice.backend.name != "triton" and "triton" in choice.rejected
    assert "CPU" in choice.rejected["triton"]


@pytest.mark.parametrize("op", ["chunk", "recurrent"])
def test_config_space_declared(op):
    backend = _backend()
    call = _call(device="cuda", op=op)
    configs = backend.configs(call)
    default = backend.default_config(call)
    assert default in configs and len(configs) > 1
    assert all(set(default) <= set(c) for c in configs)


if __name__ == "__main__":
    _worker(sys.argv[1:])
