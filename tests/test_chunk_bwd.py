"""The chunkwise backward reference (kda_compile/reference_bwd.py) against autograd through the float64 reference,
and against finite differences (gradcheck) at a tiny size."""
from __future__ import annotations

import pytest
import torch

from kda_compile.reference import KDAOptions, kda_reference
from kda_compile.reference_bwd import kda_reference_bwd
from kda_inputs import make_inputs, one_cpu_thread, rel_err  # noqa: F401  (fixture)

NAMES = ("q", "k", "v", "g", "beta", "initial_state", "A_log", "dt_bias")

# name -> case; fields map to make_inputs and KDAOptions
CASES = {
    "ragged_gva_h0": dict(B=2, T=70, H=1, HV=2, K=16, V=8),
    "varlen_empty_one_token": dict(cu=[0, 5, 50, 50, 99, 100], H=1, HV=1, K=8, V=8),
    "c32_state_v_first": dict(B=1, T=45, H=2, HV=2, K=8, V=16, C=32, state_v_first=True),
    "gate_l2norm_sigmoid": dict(B=1, T=40, H=1, HV=2, K=8, V=8, gate="raw", l2norm=True, beta_logits=True),
    "safe_gate_neg_eig": dict(B=1, T=33, H=2, HV=4, K=8, V=8, gate="raw", lower_bound=-5.0, beta_logits=True,
                              neg_eig=True, C=32),
    "safe_gate_no_A_log": dict(B=2, T=20, H=1, HV=1, K=8, V=8, gate="raw", lower_bound=-3.0, drop_A_log=True),
    "masked_gate_-1000": dict(B=1, T=70, H=1, HV=1, K=8, V=8, masked=True),
    "no_initial_state_no_dht": dict(B=1, T=64, H=1, HV=1, K=8, V=8, h0=False, dht=False),
    # raw gate around 20 (softplus switches to linear there), A_log small so the decay stays mild
    "softplus_linear_region": dict(B=1, T=30, H=1, HV=1, K=8, V=8, gate="raw", gshift=20.0, A_log=-5.0),
}


def case_inputs(case, seed=0):
    """float64 inputs (leaf tensors), the options, and random cotangents ``(do, dht)`` of a case."""
    a = make_inputs(B=case.get("B", 1), T=case.get("T", 1), H=case["H"], HV=case["HV"], K=case["K"], V=case["V"],
                    dtype=torch.float64, gate=case.get("gate", "log"), beta_logits=case.get("beta_logits", False),
                    initial_state=case.get("h0", True), cu_seqlens=case.get("cu"),
                    state_v_first=case.get("state_v_first", False), seed=seed)
    if case.get("drop_A_log"):
        a.pop("A_log")
    if case.get("gshift"):
        a["g"] = a["g"] + case["gshift"]
    if case.get("A_log") is not None:
        a["A_log"] = torch.full_like(a["A_log"], case["A_log"])
    if case.get("masked"):
        a["g"][:, 7] = -1000.0
        a["g"][:, 20:23, :, ::2] = -1000.0
    opts = KDAOptions(scale=case["K"] ** -0.5, use_qk_l2norm_in_kernel=case.get("l2norm", False),
                      use_gate_in_kernel=case.get("gate") == "raw",
                      use_beta_sigmoid_in_kernel=case.get("beta_logits", False),
                      allow_neg_eigval=case.get("neg_eig", False), lower_bound=case.get("lower_bound"),
                      chunk_size=case.get("C", 64), state_v_first=case.get("state_v_first", False))
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(a["v"].shape, generator=gen, dtype=torch.float64)
    o, ht = kda_reference(*(a.get(n) for n in ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens",
                                               "A_log", "dt_bias")), opts=opts)
    dht = torch.randn(ht.shape, generator=gen, dtype=torch.float64) if case.get("dht", True) else None
    return a, opts, do, dht


def autograd_grads(a, opts, do, dht):
    """Every input's gradient by autograd through kda_reference (None for absent inputs)."""
    leaves = {n: a[n].detach().clone().requires_grad_(True) for n in NAMES if a.get(n) is not None}
    o, ht = kda_reference(*(leaves.get(n) for n in ("q", "k", "v", "g", "beta", "initial_state")),
                          a.get("cu_seqlens"), leaves.get("A_log"), leaves.get("dt_bias"), opts=opts)
    loss = (o * do).sum() + ((ht * dht).sum() if dht is not None else 0.0)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    out = dict(zip(leaves, grads))
    return tuple(out.get(n) for n in NAMES)


def reference_grads(a, opts, do, dht):
    return kda_reference_bwd(a["q"], a["k"], a["v"], a["g"], a["beta"], a.get("initial_state"), a.get("cu_seqlens"),
                             a.get("A_log"), a.get("dt_bias"), opts, do, dht)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_bwd_matches_autograd(name):
    a, opts, do, dht = case_inputs(CASES[name])
    got = reference_grads(a, opts, do, dht)
    want = autograd_grads(a, opts, do, dht)
    for n, x, y in zip(NAMES, got, want):
        if y is None:
            assert x is None or n in ("A_log", "dt_bias") and not opts.use_gate_in_kernel, n
            continue
        assert x is not None and x.shape == y.shape and x.dtype == y.dtype, n
        assert torch.isfinite(x).all(), n
        err = rel_err(x, y)
        assert err < 1e-10 or y.norm() < 1e-12 and (x - y).norm() < 1e-12, f"{name} {n}: rel err {err:.2e}"


class _ReferenceKDA(torch.autograd.Function):
    """kda_reference forward with kda_reference_bwd as its backward (what gradcheck checks)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, A_log, dt_bias, opts):
        ctx.save_for_backward(q, k, v, g, beta, h0, A_log, dt_bias)
        ctx.opts = opts
        return kda_reference(q, k, v, g, beta, h0, None, A_log, dt_bias, opts=opts)

    @staticmethod
    def backward(ctx, do, dht):
        grads = kda_reference_bwd(*ctx.saved_tensors[:6], None, *ctx.saved_tensors[6:], ctx.opts, do, dht)
        return (*grads, None)


@pytest.mark.parametrize("gate", ["log", "raw"])
def test_reference_bwd_gradcheck(gate):
    a = make_inputs(B=1, T=19, H=1, HV=2, K=4, V=3, dtype=torch.float64, gate=gate, beta_logits=gate == "raw",
                    seed=3)
    opts = KDAOptions(scale=0.5, use_qk_l2norm_in_kernel=gate == "raw", use_gate_in_kernel=gate == "raw",
                      use_beta_sigmoid_in_kernel=gate == "raw", chunk_size=32)
    inputs = [a.get(n) for n in NAMES]
    inputs = [x.requires_grad_(True) if x is not None else None for x in inputs]
    assert torch.autograd.gradcheck(lambda *xs: _ReferenceKDA.apply(*xs, opts), inputs, eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ autograd through chunk_kda

@pytest.mark.parametrize("backend", ["reference", "triton", "tilelang"])
def test_autograd_through_chunk_kda_on_each_backend(backend):
    """loss.backward() through the public op with backend= forced: the custom op kda_bwd dispatches to that
    backend's backward, whose gradients match autograd through the float64 reference."""
    import importlib.util
    import os
    from kda_compile import chunk_kda, explain
    if backend == "triton" and (importlib.util.find_spec("triton") is None or
                                (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1")):
        pytest.skip("Triton needs a GPU or its interpreter (conftest turns it on without a GPU)")
    if backend == "tilelang" and importlib.util.find_spec("tilelang") is None:
        pytest.skip("tilelang is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    B, T, H, HV, K, V = 1, 70, 1, 2, 32, 32
    base = dict(q=torch.randn(B, T, H, K, generator=gen), k=torch.randn(B, T, H, K, generator=gen),
                v=torch.randn(B, T, HV, V, generator=gen), g=torch.randn(B, T, HV, K, generator=gen),
                beta=torch.randn(B, T, HV, generator=gen), initial_state=torch.randn(B, HV, K, V, generator=gen) * 0.3,
                A_log=torch.randn(HV, generator=gen) * 0.3, dt_bias=torch.randn(HV * K, generator=gen) * 0.3)
    flags = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)
    do = torch.randn(B, T, HV, V, generator=gen)
    dht = torch.randn(B, HV, K, V, generator=gen)

    def grads(dtype, dev, name):
        leaves = {n: x.to(dev, dtype).requires_grad_(True) for n, x in base.items()}
        o, s = chunk_kda(**leaves, **flags, output_final_state=True, backend=name)
        torch.autograd.backward([o, s], [do.to(dev, o.dtype), dht.to(dev, s.dtype)])
        return {n: x.grad.detach().cpu().double() for n, x in leaves.items()}

    ref = grads(torch.float64, "cpu", "reference")
    got = grads(torch.float32, device, backend)
    for n in ref:
        err = ((got[n] - ref[n]).norm() / ref[n].norm()).item()
        assert err < (3e-3 if device == "cuda" else 1e-4), f"d{n}: rel err {err:.3g}"
    leaves = {n: x.to(device, torch.float32) for n, x in base.items()}
    # a backend named on the forward computes the backward too, on the GPU as on the CPU
    assert explain(**leaves, **flags, op="chunk_backward", backend=backend).backend.name == backend
