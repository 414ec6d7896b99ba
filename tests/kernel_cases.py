"""Shared machinery of the per-op kernel tests (test_chunk.py, test_decode.py): which backends can run here,
inputs of one case at a dtype and device, the float64 recurrence for the same rounded inputs, and the
public call with a forced backend.

A case is a dict: sizes (``B, T`` or ``cu``, ``H, HV, K, V``, chunk ``C``), ``dtype`` (a name), gate
(``gate="log"`` a log decay, ``"raw"`` the raw gate with A_log/dt_bias, ``lower_bound`` for the safe gate,
``drop_A_log``), ``gscale`` (stronger decay), ``masked`` (some gates at -1000), ``neg_inf`` (some at -inf),
``l2norm``, ``beta_logits``, ``neg_eig``, ``state_v_first``, ``h0`` (initial state, default on) and an optional
``tol`` floor.  Errors are ``||out - ref|| / ||ref||`` against the float64 token recurrence on fresh random
inputs (the recurrence sees exactly the rounded inputs the kernel sees).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from kda_inputs import make_inputs, rel_err

BACKEND_NAMES = ("reference", "triton", "tilelang")
GPU = torch.cuda.is_available()


def backend_skip_reason(name: str) -> str | None:
    """Why ``name`` cannot run kernel tests on this machine, or None."""
    if name == "reference":
        return None
    if importlib.util.find_spec(name) is None:
        return f"{name} is not installed"
    if name == "triton" and not GPU and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "no GPU and TRITON_INTERPRET is off (tests/conftest.py turns it on before Triton loads)"
    return None


def backends(*names: str) -> list:
    """pytest params of the backends, each skipped with its reason where it cannot run."""
    return [pytest.param(n, id=n, marks=pytest.mark.skipif(backend_skip_reason(n) is not None,
                                                             reason=backend_skip_reason(n) or ""))
            for n in (names or BACKEND_NAMES)]


def device() -> str:
    return "cuda" if GPU else "cpu"


def case_inputs(case: dict, device: str, seed: int | None = None) -> tuple[dict, dict]:
    """``(low, ref)``: the case's inputs at its dtype on ``device``, and the same values in float64."""
    dtype = getattr(torch, case["dtype"])
    a = make_inputs(B=case.get("B", 1), T=case.get("T", 1), H=case["H"], HV=case.get("HV"), K=case["K"],
                    V=case["V"], dtype=torch.float64, gate=case.get("gate", "log"),
                    beta_logits=case.get("beta_logits", False), initial_state=case.get("h0", True),
                    cu_seqlens=case.get("cu"), state_v_first=case.get("state_v_first", False), seed=seed)
    if case.get("drop_A_log"):
        a.pop("A_log")
    if case.get("gscale"):
        a["g"] = a["g"] * case["gscale"]
    if case.get("masked") or case.get("neg_inf"):  # masked positions: a gate that forgets everything
        low_gate = -1000.0 if case.get("masked") else float("-inf")
        g = a["g"].clone()
        g[:, 7] = low_gate
        g[:, 20:23, :, ::2] = low_gate
        a["g"] = g
    low = {}
    for name, x in a.items():
        if name == "cu_seqlens":
            low[name] = x.to(device)
        elif name in ("initial_state", "A_log", "dt_bias"):
            low[name] = x.to(device=device, dtype=torch.float32)
        else:
            low[name] = x.to(device=device, dtype=dtype)
    # the reference runs in float64 where the inputs are: on a GPU its token loop takes seconds, not minutes
    ref = {name: (x.double() if x.is_floating_point() else x) for name, x in low.items()}
    return low, ref


def flags(case: dict) -> dict:
    """The API keywords of a case."""
    kw = dict(use_qk_l2norm_in_kernel=case.get("l2norm", False), use_gate_in_kernel=case.get("gate") == "raw",
              use_beta_sigmoid_in_kernel=case.get("beta_logits", False), allow_neg_eigval=case.get("neg_eig", False),
              state_v_first=case.get("state_v_first", False))
    if case.get("lower_bound") is not None:
        kw["lower_bound"] = case["lower_bound"]
    return kw


def recurrence64(ref: dict, case: dict):
    """``(o, final_state)`` of the float64 token recurrence."""
    from kda_compile import fused_recurrent_kda
    return fused_recurrent_kda(**ref, **flags(case), output_final_state=True, backend="reference")


def finite_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error, infinite when ``out`` has a NaN or an infinity."""
    out = out.detach().to(ref.device).double()
    return float("inf") if not torch.isfinite(out).all() else rel_err(out, ref.double())
