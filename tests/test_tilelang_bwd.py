"""TileLang chunkwise backward (kernels_tl/chunk_bwd.py) on TileLang's C target (CPU) and on the GPU.

Each case's gradients are compared with the float64 reference backward (kda_compile/reference_bwd.py) and with
autograd through the float64 forward reference, on the same (rounded) inputs; errors are ``||grad - ref|| /
||ref||``.  Also: determinism (two calls bitwise equal), causality of gradients and input checks.  The C target
compiles each program once per process, so the cases share as few flag combinations as they can (K = V = 32).
On the CPU the kernels take bf16 inputs widened to float32 and round to bf16 where the GPU does (tile operands,
stored intermediates: target.TargetOps.to_tile), so those cases see the GPU's 16-bit rounding too.
"""
import pytest
import torch

pytest.importorskip("tilelang")

from kda_compile.reference_bwd import kda_reference_bwd  # noqa: E402
from kda_compile.kernels_tl.chunk_bwd import chunk_kda_bwd  # noqa: E402
from kda_inputs import one_cpu_thread, rel_err  # noqa: E402,F401  (fixture)
from test_chunk_bwd import autograd_grads, case_inputs  # noqa: E402

NAMES = ("q", "k", "v", "g", "beta", "initial_state", "A_log", "dt_bias")
ARGS = ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "A_log", "dt_bias")
TOL = {"float32": 1e-4, "bfloat16": 3e-2}
D = dict(H=1, HV=2, K=32, V=32)

# name -> case (fields as test_chunk_bwd.case_inputs, plus dtype and tol); four flag combinations in all
CASES = {
    # log gate, initial state + final-state cotangent, chunk 64
    "fp32_ragged_gva": dict(dtype="float32", B=2, T=70, **D),
    "bf16_ragged_gva": dict(dtype="bfloat16", B=1, T=150, **D),
    "fp32_varlen_empty_one_token": dict(dtype="float32", cu=[0, 1, 50, 50, 120], **D),
    # gates of -1000: the float32 cumsum keeps ~6e-5 absolute, hence the looser bound (as the forward's test)
    "fp32_masked_gate_-1000": dict(dtype="float32", B=1, T=100, masked=True, tol=3e-4, **D),
    # raw gate (softplus with A_log, dt_bias), q/k L2 norm, beta logits
    "fp32_gate_l2norm_sigmoid": dict(dtype="float32", B=1, T=90, gate="raw", l2norm=True, beta_logits=True, **D),
    # safe gate with A_log, allow_neg_eigval, state_v_first, chunk 32, GVA x2 over two key heads, varlen
    "fp32_safe_gate_neg_eig_c32": dict(dtype="float32", cu=[0, 1, 40, 40, 100], H=2, HV=4, K=32, V=32, gate="raw",
                                       lower_bound=-5.0, beta_logits=True, neg_eig=True, l2norm=True, C=32,
                                       state_v_first=True),
    "bf16_safe_gate_neg_eig_c32": dict(dtype="bfloat16", B=1, T=77, H=2, HV=4, K=32, V=32, gate="raw",
                                       lower_bound=-5.0, beta_logits=True, neg_eig=True, l2norm=True, C=32,
                                       state_v_first=True),
    # safe gate without A_log, no initial state and no final-state cotangent
    "fp32_safe_gate_no_A_log_no_state": dict(dtype="float32", B=1, T=80, **D, gate="raw", lower_bound=-3.0,
                                             drop_A_log=True, C=32, state_v_first=True, h0=False, dht=False),
}


def low_inputs(case, seed=0):
    """float64 case inputs rounded to the case's dtype (q, k, v, g, beta; float32 for the rest), the float64
    copies of exactly those values, the options and the cotangents."""
    a, opts, do, dht = case_inputs(case, seed=seed)
    dtype = getattr(torch, case["dtype"])
    low = {n: (x.to(dtype if n in ("q", "k", "v", "g", "beta") else torch.float32) if x.is_floating_point() else x)
           for n, x in a.items()}
    ref = {n: x.double() if x.is_floating_point() else x for n, x in low.items()}
    return low, ref, opts, do, dht


def tilelang_grads(low, opts, do, dht, dtype, config=None):
    return chunk_kda_bwd(*(low.get(n) for n in ARGS), opts, do.to(dtype), dht.float() if dht is not None else None,
                         config)


@pytest.mark.parametrize("name", list(CASES))
def test_tilelang_bwd_gradients(name):
    case = CASES[name]
    dtype = getattr(torch, case["dtype"])
    tol = case.get("tol", TOL[case["dtype"]])
    low, ref, opts, do, dht = low_inputs(case)
    got = tilelang_grads(low, opts, do, dht, dtype)
    want = kda_reference_bwd(*(ref.get(n) for n in ARGS), opts, do, dht)
    auto = autograd_grads(ref, opts, do, dht)
    for n, x, y, z in zip(NAMES, got, want, auto):
        if y is None:
            assert x is None, f"{name}: d{n} should be None"
            continue
        assert x is not None and x.shape == y.shape and x.dtype == low[n].dtype, f"{name}: d{n} shape/dtype"
        assert torch.isfinite(x).all(), f"{name}: d{n} not finite"
        e_ref, e_auto = rel_err(x, y), rel_err(x, z)
        assert e_ref < tol and e_auto < tol, f"{name} d{n}: vs reference {e_ref:.2e}, vs autograd {e_auto:.2e}"


def test_tilelang_bwd_deterministic():
    case = CASES["fp32_gate_l2norm_sigmoid"]
    low, _, opts, do, dht = low_inputs(case, seed=5)
    first = tilelang_grads(low, opts, do, dht, torch.float32)
    second = tilelang_grads(low, opts, do, dht, torch.float32)
    for n, x, y in zip(NAMES, first, second):
        assert (x is None and y is None) or torch.equal(x, y), f"d{n} differs between two calls"


def test_tilelang_bwd_causal():
    """A loss on the outputs before p: gradients of inputs before p do not change, bit for bit, when inputs
    after p change, and gradients of inputs after p are exactly zero."""
    case = dict(CASES["fp32_ragged_gva"], B=1, T=150, dht=False)
    low, _, opts, do, _ = low_inputs(case)
    cut = 70  # inside a 16-row block of the second chunk
    do = do.clone()
    do[:, cut:] = 0
    first = tilelang_grads(low, opts, do, None, torch.float32)
    late = dict(low)
    gen = torch.Generator().manual_seed(7)
    for n in ("q", "k", "v", "g", "beta"):
        x = low[n].clone()
        noise = torch.randn(x[:, cut:].shape, generator=gen).to(x.dtype)
        x[:, cut:] = -noise.abs() if n == "g" else noise
        late[n] = x
    second = tilelang_grads(late, opts, do, None, torch.float32)
    for n, x, y in zip(NAMES, first, second):
        if x is None:
            continue
        if n in ("q", "k", "v", "g", "beta"):
            assert torch.equal(x[:, :cut], y[:, :cut]), f"d{n} before p changed"
            assert (x[:, cut:] == 0).all() and (y[:, cut:] == 0).all(), f"d{n} after p not exactly zero"
        else:
            assert torch.equal(x, y), f"d{n} changed"


def test_tilelang_bwd_only_empty_sequences():
    """No tokens at all: the initial state's gradient is the final state's cotangent, the rest is empty."""
    q, k = torch.randn(1, 0, 1, 32), torch.randn(1, 0, 1, 32)
    v, g, beta = torch.randn(1, 0, 2, 32), -torch.rand(1, 0, 2, 32), torch.rand(1, 0, 2)
    h0, dht = torch.randn(2, 2, 32, 32), torch.randn(2, 2, 32, 32)
    cu = torch.tensor([0, 0, 0])
    opts = case_inputs(CASES["fp32_ragged_gva"])[1]
    dq, dk, dv, dg, dbeta, dh0, _, _ = chunk_kda_bwd(q, k, v, g, beta, h0, cu, None, None, opts, torch.zeros_like(v), dht)
    assert torch.equal(dh0, dht) and dq.shape == q.shape and dv.shape == v.shape and dbeta.shape == beta.shape


def test_tilelang_bwd_rejects_bad_input():
    low, _, opts, do, dht = low_inputs(CASES["fp32_ragged_gva"])
    with pytest.raises(ValueError, match="do must have"):
        tilelang_grads(low, opts, do[:, :-1], dht, torch.float32)
    with pytest.raises(ValueError, match="dht must have"):
        tilelang_grads(low, opts, do, dht[:, :1], torch.float32)
    with pytest.raises(ValueError, match="unknown TileLang BackwardConfig"):
        tilelang_grads(low, opts, do, dht, torch.float32, config={"bwd_BV": 32})


def test_tilelang_backend_run_backward():
    """The backend's ``run_backward`` hook returns the entry point's gradients for a chunk call."""
    from kda_compile.dispatch import KDACall, Problem
    from kda_compile.kernels_tl.backend import run_backward
    low, _, opts, do, dht = low_inputs(CASES["fp32_ragged_gva"])
    q, v = low["q"], low["v"]
    B, T, H, K = q.shape
    problem = Problem(B, T, H, v.shape[2], K, v.shape[3], B, False, q.dtype, q.device)
    call = KDACall("chunk", problem, opts, *(low.get(n) for n in ARGS))
    got = run_backward(call, {}, do.float(), dht.float())
    want = tilelang_grads(low, opts, do, dht, torch.float32)
    for n, x, y in zip(NAMES, got, want):
        assert (x is None and y is None) or torch.equal(x, y), f"d{n}"


# ------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("setting", ["prenorm_log", "l2norm_safe_gate"])
def test_tilelang_bwd_gpu_standard_shape(setting):
    """bf16 at B2·T8192·H16, D = 128: every gradient within 1e-2 of the float64 reference backward."""
    from kda_compile.reference import KDAOptions, l2_normalize
    from kda_inputs import make_inputs
    safe = setting == "l2norm_safe_gate"
    a = make_inputs(B=2, T=8192, H=16, K=128, V=128, dtype=torch.float64, device="cuda",
                    gate="raw" if safe else "log", beta_logits=safe, seed=0)
    if not safe:
        a["q"], a["k"] = l2_normalize(a["q"]), l2_normalize(a["k"])
    opts = KDAOptions(scale=128 ** -0.5, use_qk_l2norm_in_kernel=safe, use_gate_in_kernel=safe,
                      use_beta_sigmoid_in_kernel=safe, lower_bound=-5.0 if safe else None)
    low = {n: x.to(torch.bfloat16 if n in ("q", "k", "v", "g", "beta") else torch.float32) for n, x in a.items()}
    gen = torch.Generator(device="cuda").manual_seed(1)
    do = torch.randn(a["v"].shape, generator=gen, device="cuda", dtype=torch.float64)
    dht = torch.randn(a["initial_state"].shape, generator=gen, device="cuda", dtype=torch.float64)
    got = tilelang_grads(low, opts, do, dht, torch.bfloat16)
    ref = {n: x.double() for n, x in low.items()}
    want = kda_reference_bwd(*(ref.get(n) for n in ARGS), opts, do, dht)
    for n, x, y in zip(NAMES, got, want):
        assert (x is None) == (y is None), n
        if x is not None:
            assert rel_err(x, y) <= 1e-2, f"d{n}: {rel_err(x, y):.2e}"
