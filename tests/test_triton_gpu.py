"""Triton backend on a CUDA GPU against the float64 reference: the cases of tests/test_triton_fwd.py at the
same sizes, plus K = V = 128 chunk cases.  Skipped without CUDA.

Tolerances are GPU ones: float32 products run as tf32 on tensor cores (~1e-3), bf16 intermediates ~1e-2.
"""
from __future__ import annotations

import pytest
import torch

from test_triton_fwd import CASES, run_case

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_TOL = {"float32": 3e-3, "float16": 1e-2, "bfloat16": 3e-2}


def _k128_pair(impl: str) -> dict:
    """Two K = V = 128 cases of one intra organisation: the safe gate (every row block factored; split3 checks no
    row) and a masked gate (g = -1000 on some tokens: the exact fallback / element-wise diagonal tiles)."""
    return {f"chunk_bf16_k128_{impl}_safe_gate": dict(op="chunk", dtype="bfloat16", cu=[0, 1, 300, 777, 1000], H=2,
                                                      HV=4, K=128, V=128, gate="raw", lower_bound=-5.0, l2norm=True,
                                                      beta_logits=True, config={"intra_impl": impl}),
            f"chunk_fp32_k128_{impl}_masked": dict(op="chunk", dtype="float32", B=1, T=200, H=1, HV=2, K=128, V=128,
                                                   masked=True, tol=3e-4, config={"intra_impl": impl, "intra_BK": 64})}


GPU_CASES = {
    **CASES,
    "chunk_bf16_k128_varlen": dict(op="chunk", dtype="bfloat16", cu=[0, 1, 300, 777, 1000], H=2, HV=4, K=128, V=128,
                                   l2norm=True),
    "chunk_fp16_k128_safe_gate": dict(op="chunk", dtype="float16", B=2, T=333, H=2, HV=2, K=128, V=128, gate="raw",
                                      lower_bound=-5.0, l2norm=True, beta_logits=True),
    # the split organisations of the intra stage (their small cases come with CASES) at K = V = 128
    **{name: case for impl in ("split", "split2", "split3") for name, case in _k128_pair(impl).items()},
    "chunk_bf16_k128_split2_norms_prep": dict(op="chunk", dtype="bfloat16", B=2, T=250, H=2, HV=2, K=128, V=128,
                                              l2norm=True, gate="raw", lower_bound=-5.0,
                                              config={"intra_impl": "split2", "intra_norms": "prep"}),
    "chunk_bf16_k128_split2_outputs_main": dict(op="chunk", dtype="bfloat16", B=2, T=250, H=2, HV=2, K=128, V=128,
                                                l2norm=True, config={"intra_impl": "split2", "intra_a_BK": 32,
                                                                     "intra_a_outputs": "main"}),
    "chunk_bf16_k128_split3_log_l2": dict(op="chunk", dtype="bfloat16", B=2, T=250, H=2, HV=2, K=128, V=128,
                                          l2norm=True, config={"intra_impl": "split3"}),
    # causality bit for bit on the tensor cores (see tests/test_triton_fwd.py)
    "causal_fp32_k128_split3_log": dict(op="causal", dtype="float32", B=1, T=300, H=2, HV=2, K=128, V=128,
                                        causal_at=137, config={"intra_impl": "split3"}),
    "causal_bf16_k128_split3_safe": dict(op="causal", dtype="bfloat16", B=2, T=300, H=2, HV=2, K=128, V=128,
                                         causal_at=137, gate="raw", lower_bound=-5.0, l2norm=True,
                                         config={"intra_impl": "split3"}),
    "causal_fp32_k128_default": dict(op="causal", dtype="float32", B=1, T=300, H=2, HV=2, K=128, V=128,
                                     causal_at=137),
    # the inverse's diagonal blocks by products (solve_diag) on the tensor cores
    "chunk_bf16_k128_split3_diag_tf32": dict(op="chunk", dtype="bfloat16", cu=[0, 1, 300, 777, 1000], H=2, HV=4,
                                             K=128, V=128, gate="raw", lower_bound=-5.0, l2norm=True,
                                             beta_logits=True, neg_eig=True,
                                             config={"intra_impl": "split3", "solve_diag": "tf32"}),
    "chunk_fp32_k128_split3_diag_tf32x3": dict(op="chunk", dtype="float32", B=2, T=250, H=2, HV=2, K=128, V=128,
                                               l2norm=True, neg_eig=True, beta_logits=True,
                                               config={"intra_impl": "split3", "solve_diag": "tf32x3"}),
    "rec_bf16_decode_b64": dict(op="recurrent", dtype="bfloat16", B=64, T=1, H=4, HV=8, K=128, V=128, l2norm=True),
}


@pytest.mark.parametrize("name", list(GPU_CASES))
def test_triton_gpu_matches_float64_reference(name):
    case = GPU_CASES[name]
    torch.manual_seed(0)
    errors = run_case(case, device="cuda")
    tol = max(case.get("tol", 0.0), GPU_TOL[case["dtype"]])
    for quantity, err in errors.items():
        if quantity == "leak":  # causality is exact
            assert err == 0.0, f"{name}: earlier outputs moved by {err:.3g} when only later inputs changed"
        else:
            assert err <= tol, f"{name}: {quantity} relative error {err:.3g} > {tol:g}"
