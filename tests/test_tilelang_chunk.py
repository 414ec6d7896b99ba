"""TileLang chunkwise forward (kda_compile.kernels_tl) against the float64 recurrence.

On the CPU the kernels are built for TileLang's C target (small sizes); GPU cases run the CUDA build at the
standard shapes.  Errors are ||out - ref|| / ||ref||.
"""
import pytest
import torch

pytest.importorskip("tilelang")

import kda_compile  # noqa: E402
from tilelang_cases import inputs, recurrence64, rel_err  # noqa: E402

CPU_TOL = [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)]


def run_chunk(a, **kw):
    return kda_compile.chunk_kda(a["q"], a["k"], a["v"], a["g"], a["beta"], initial_state=a.get("initial_state"),
                                 output_final_state=True, cu_seqlens=a.get("cu_seqlens"), A_log=a.get("A_log"),
                                 dt_bias=a.get("dt_bias"), backend="tilelang", **kw)


def check(a, tol, **kw):
    o, ht = run_chunk(a, **kw)
    ro, rh = recurrence64(a, **kw)
    assert torch.isfinite(o.float()).all() and torch.isfinite(ht).all()
    e_o, e_h = rel_err(o, ro), rel_err(ht, rh)
    assert e_o < tol and e_h < tol, f"rel err o={e_o:.2e} state={e_h:.2e} (tol {tol:.0e})"
    return e_o, e_h


@pytest.mark.parametrize("dtype,tol", CPU_TOL)
def test_ragged_gva_state(dtype, tol):
    """T not a multiple of the chunk, grouped value heads, initial and final state, L2 norm in kernel."""
    a = inputs(dtype, B=2, T=83, H=1, HV=2, K=32, V=32)
    check(a, tol, use_qk_l2norm_in_kernel=True)


@pytest.mark.parametrize("dtype,tol", CPU_TOL[:1])
def test_varlen_empty_and_single_token(dtype, tol):
    """Packed sequences: one of a single token, one empty, one spanning chunks."""
    a = inputs(dtype, cu_seqlens=[0, 1, 70, 70, 96], H=2, K=32, V=32)
    check(a, tol, use_qk_l2norm_in_kernel=True)


@pytest.mark.parametrize("dtype,tol", CPU_TOL[:1])
@pytest.mark.parametrize("chunk_size", [32, 64])
def test_safe_gate_sigmoid_beta_state_v_first(dtype, tol, chunk_size):
    """use_gate_in_kernel with A_log/dt_bias and lower_bound, beta logits with allow_neg_eigval,
    state stored [N, HV, V, K]."""
    a = inputs(dtype, B=1, T=75, H=2, K=32, V=64, gate="raw", beta_logits=True, state_v_first=True)
    check(a, tol, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, safe_gate=True, lower_bound=-5.0,
          use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True, state_v_first=True, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype,tol", CPU_TOL[:1])
def test_softplus_gate_no_state(dtype, tol):
    """The softplus gate (-exp(A_log) softplus(g + dt_bias)), no initial state."""
    a = inputs(dtype, B=1, T=40, H=1, K=64, V=32, gate="raw", initial_state=False)
    o, ht = run_chunk(a, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True)
    ro, rh = recurrence64(a, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True)
    assert rel_err(o, ro) < tol and rel_err(ht, rh) < tol


def test_strong_gates_stay_finite():
    """Gates as low as -1000 (masked positions) must not overflow the intra-chunk factorisation.  (The
    tolerance is looser: after a -1000 gate the float32 cumulative decay is ~-1e4, whose rounding, ~1e-3
    absolute, enters every later exp(Gamma_r - Gamma_s).)"""
    a = inputs(torch.float32, B=1, T=64, H=1, K=32, V=32)
    a["g"][:, 10:20] = -1000.0
    a["g"][:, 40] = -80.0
    check(a, 2e-3, use_qk_l2norm_in_kernel=True)


@pytest.mark.parametrize("diag_gemm", [True, False])
def test_diagonal_block_paths(diag_gemm):
    """Both ways of computing the diagonal blocks (tensor-core factorisation, exact elementwise)."""
    from kda_compile.api import _options
    from kda_compile.kernels_tl.chunk_fwd import chunk_kda_fwd

    a = inputs(torch.float32, B=1, T=50, H=1, K=32, V=32)
    opts = _options(a["q"], None, True, False, False, False, None, 64, False)
    o, ht = chunk_kda_fwd(a["q"], a["k"], a["v"], a["g"], a["beta"], a["initial_state"], None, None, None, opts,
                          True, {"diag_gemm": diag_gemm})
    ro, rh = recurrence64(a, use_qk_l2norm_in_kernel=True)
    assert rel_err(o, ro) < 1e-4 and rel_err(ht, rh) < 1e-4


def test_cpu_default_is_reference():
    """On CPU tensors the TileLang C build runs only when named; explain says why."""
    a = inputs(torch.float32, B=1, T=8)
    choice = kda_compile.explain(a["q"], a["k"], a["v"], a["g"], a["beta"])
    assert choice.backend.name != "tilelang"
    assert "tilelang" in str(choice)


def test_unsupported_head_dim_falls_back_with_reason():
    a = inputs(torch.float32, B=1, T=8, K=48, V=48)
    with pytest.raises(ValueError, match="head dims"):
        run_chunk(a)


# ---------------------------------------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STANDARD = [(2, 8192, 16), (1, 32768, 16), (8, 4096, 32)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B,T,H", STANDARD)
@pytest.mark.parametrize("gate", ["log", "safe"])
def test_gpu_standard_shapes(B, T, H, gate):
    """bf16, D=128 at the standard shapes: relative error <= 5e-3 against the float64 recurrence."""
    kw = dict(use_qk_l2norm_in_kernel=True)
    a = inputs(torch.bfloat16, "cuda", B=B, T=T, H=H, K=128, V=128, gate="raw" if gate == "safe" else "log")
    a["g"], a["beta"] = a["g"].float(), a["beta"].float()  # as models produce them (and as bench/ times)
    if gate == "safe":
        kw.update(use_gate_in_kernel=True, safe_gate=True, lower_bound=-5.0)
    e_o, e_h = check(a, 5e-3, **kw)
    print(f"B{B} T{T} H{H} {gate}: rel err o={e_o:.2e} state={e_h:.2e}")


@pytest.mark.gpu
@gpu
def test_gpu_long_sequence():
    """T = 65536 stays finite and within 1e-2."""
    a = inputs(torch.bfloat16, "cuda", B=1, T=65536, H=4, K=128, V=128)
    e_o, e_h = check(a, 1e-2, use_qk_l2norm_in_kernel=True)
    print(f"T65536: rel err o={e_o:.2e} state={e_h:.2e}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,tol,K", [(torch.float16, 5e-3, 128), (torch.float32, 2e-3, 64)])
def test_gpu_dtypes_varlen_gva(dtype, tol, K):
    a = inputs(dtype, "cuda", cu_seqlens=[0, 1, 300, 300, 1000], H=2, HV=4, K=K, V=K)
    check(a, tol, use_qk_l2norm_in_kernel=True)
