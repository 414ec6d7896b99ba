"""chunk_kda, the chunkwise forward, on every backend against the float64 token recurrence.

On a CPU the kernels run at small sizes: Triton under its interpreter (``TRITON_INTERPRET=1``, set by
conftest.py before Triton loads), TileLang on its C target; the ``gpu`` cases run at the standard shapes.
Besides accuracy: causality bit for bit (changing later tokens, or a NaN gate at token t, never moves an earlier
output), a -inf gate ("forget everything"), the states entering each chunk, and the kernel-config knobs.
"""
from __future__ import annotations

import pytest
import torch

from kda_compile import chunk_kda
from kernel_cases import GPU, backends, case_inputs, device, finite_err, flags, recurrence64

# CPU tolerances per backend and dtype: the interpreter and the C target compute float32 products exactly;
# the reference is the chunkwise form in the input precision (float32 here).
CPU_TOL = {"reference": {"float32": 1e-5, "float16": 1e-2, "bfloat16": 3e-2},
           "triton": {"float32": 2e-5, "float16": 1e-2, "bfloat16": 3e-2},
           "tilelang": {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}}
# GPU: float32 products on tensor cores as TF32 where PyTorch allows it, bf16 intermediates
GPU_TOL = {"float32": 3e-3, "float16": 1e-2, "bfloat16": 3e-2}

CASES = {
    "ragged_gva_fp32": dict(dtype="float32", B=2, T=70, H=1, HV=2, K=32, V=32),
    "varlen_prologue_bf16": dict(dtype="bfloat16", cu=[0, 5, 50, 50, 99, 100], H=1, HV=2, K=32, V=32, gate="raw",
                                 l2norm=True, beta_logits=True),
    "c32_safe_vfirst_fp16": dict(dtype="float16", B=1, T=45, H=2, HV=2, K=64, V=32, C=32, gate="raw",
                                 lower_bound=-5.0, state_v_first=True, l2norm=True),
    "safe_noA_negeig_fp32": dict(dtype="float32", B=1, T=40, H=1, HV=1, K=32, V=32, gate="raw", lower_bound=-3.0,
                                 drop_A_log=True, beta_logits=True, neg_eig=True),
    # strong decay (|Gamma - Gamma_f| near SPAN_MAX): large factors, or the element-wise diagonal tiles
    "strong_gate_fp32": dict(dtype="float32", cu=[0, 20, 83], H=1, HV=2, K=32, V=32, gscale=30.0, tol=1e-4),
    # gates of -1000 (masked positions) and -inf (forget everything) stay finite; after such a gate the float32
    # cumulative decay is ~-1e3, whose rounding (~6e-5 absolute) enters every later exponent
    "masked_gate_l2_fp32": dict(dtype="float32", B=1, T=70, H=1, HV=2, K=32, V=32, masked=True, l2norm=True,
                                tol=3e-4),
    "neg_inf_gate_fp32": dict(dtype="float32", B=2, T=70, H=1, HV=1, K=32, V=32, neg_inf=True, tol=3e-4),
    "k128_bf16": dict(dtype="bfloat16", B=1, T=40, H=1, HV=1, K=128, V=128, l2norm=True),
    "k64_no_h0_fp32": dict(dtype="float32", B=1, T=130, H=2, HV=4, K=64, V=64, h0=False),
}


def _tol(case, backend, gpu=False):
    table = GPU_TOL if gpu else CPU_TOL[backend]
    return max(case.get("tol", 0.0), table[case["dtype"]])


def _run(low, case, backend):
    return chunk_kda(**low, **flags(case), chunk_size=case.get("C", 64), output_final_state=True, backend=backend)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", backends())
def test_chunk_matches_float64_recurrence(backend, name):
    case = CASES[name]
    low, ref = case_inputs(case, device())
    o, s = _run(low, case, backend)
    ro, rs = recurrence64(ref, case)
    tol = _tol(case, backend, GPU)
    assert o.shape == low["v"].shape and o.dtype == low["v"].dtype
    e_o, e_s = finite_err(o, ro), finite_err(s, rs)
    assert e_o <= tol and e_s <= tol, f"{backend} {name}: rel err o={e_o:.3g} state={e_s:.3g} > {tol:g}"


# ---------------------------------------------------------------------------------------------- causality

CAUSAL = {
    "log": dict(dtype="float32", B=1, T=150, H=1, HV=2, K=32, V=32, cut=70),
    "safe": dict(dtype="float32", B=1, T=150, H=1, HV=1, K=32, V=32, cut=70, gate="raw", lower_bound=-5.0,
                 l2norm=True),
    "strong": dict(dtype="float32", B=1, T=150, H=1, HV=1, K=32, V=32, cut=75, gscale=30.0),
}


def non_finite_gate_case(bad: str):
    """``(case, inputs, the same inputs with a NaN or +inf gate at token t, t)``: t = 77 lies inside a 16-row
    block, not at a chunk start."""
    case = dict(dtype="float32", B=1, T=150, H=1, HV=1, K=32, V=32, l2norm=True)
    low, _ = case_inputs(case, device())
    t = 77
    broken = dict(low)
    broken["g"] = low["g"].clone()
    broken["g"][:, t, :, 3] = float(bad)
    return case, low, broken, t


def _redraw_after(low, case):
    """The inputs with every input of the tokens from ``case["cut"]`` on (q, k, v, g, beta) redrawn."""
    cut, out = case["cut"], dict(low)
    for name in ("q", "k", "v", "g", "beta"):
        x = low[name].clone()
        x[:, cut:] = torch.randn_like(x[:, cut:].float()).to(x.dtype) * (0.5 if name == "g" else 1.0)
        if name == "g" and case.get("gate", "log") == "log":
            x[:, cut:] = -x[:, cut:].float().abs().to(x.dtype)  # log decay stays <= 0
        out[name] = x
    return out


@pytest.mark.parametrize("name", list(CAUSAL))
@pytest.mark.parametrize("backend", backends("triton", "tilelang", "reference"))
def test_later_tokens_never_move_earlier_outputs(backend, name):
    """Bit for bit, in float32 so that no output rounding hides a leak."""
    case = CAUSAL[name]
    low, _ = case_inputs(case, device())
    cut = case["cut"]
    before = _run(low, case, backend)[0][:, :cut]
    after = _run(_redraw_after(low, case), case, backend)[0][:, :cut]
    assert torch.equal(before, after), f"earlier outputs moved by {(before - after).abs().max().item():.3g}"


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("backend", backends("triton", "tilelang", "reference"))
def test_non_finite_gate_never_moves_earlier_outputs(backend, bad):
    """A NaN or +inf gate at token t (inside a 16-row block, not at a chunk start): outputs before t are bit for
    bit those of the same inputs with a finite gate there."""
    case, low, broken, t = non_finite_gate_case(bad)
    good = _run(low, case, backend)[0][:, :t]
    got = _run(broken, case, backend)[0][:, :t]
    assert torch.equal(good, got), f"outputs before t moved ({bad} gate): {(good - got).abs().max().item():.3g}"


# ---------------------------------------------------------------------------------- states entering each chunk

@pytest.mark.parametrize("cu", [None, [0, 30, 100, 101]])
@pytest.mark.parametrize("backend", backends("triton", "tilelang", "reference"))
def test_intermediate_states(backend, cu):
    """return_intermediate_states: the state entering each chunk ([B, NT, ...] or [1, total chunks, ...])."""
    from kda_compile.reference import KDAOptions, kda_reference_chunk_states
    case = dict(dtype="float32", B=2, T=70, cu=cu, H=1, HV=2, K=32, V=32, state_v_first=cu is not None)
    low, ref = case_inputs(case, device())
    opts = KDAOptions(scale=32 ** -0.5, state_v_first=case["state_v_first"])
    names = ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens")
    ro, rs, rh = kda_reference_chunk_states(*[ref.get(n) for n in names], None, None, opts)
    if backend in ("triton", "tilelang"):   # on the CPU the default dispatch would pick the reference
        from importlib import import_module
        module = "kernels_triton" if backend == "triton" else "kernels_tl"
        chunk_kda_fwd = import_module(f"kda_compile.{module}.chunk_fwd").chunk_kda_fwd
        o, s, h = chunk_kda_fwd(*[low.get(n) for n in names], None, None, opts, True, return_states=True)
    else:
        with torch.inference_mode():
            o, s, h = chunk_kda(**low, state_v_first=case["state_v_first"], output_final_state=True,
                                return_intermediate_states=True)
    assert h.shape == rh.shape
    tol = GPU_TOL["float32"] if GPU else 2e-5
    assert finite_err(o, ro) <= tol and finite_err(s, rs) <= tol and finite_err(h, rh) <= tol


# ------------------------------------------------------------------------------------------ config knobs

TRITON_KNOBS = {
    "norms_first_masked": (dict(dtype="float32", cu=[0, 20, 83], H=1, HV=2, K=32, V=16, l2norm=True, masked=True,
                                tol=3e-4), {"intra_norms": "first", "intra_row_BK": 16}),
    "diag_products_negeig": (dict(dtype="float32", B=1, T=70, H=1, HV=2, K=32, V=16, gate="raw", lower_bound=-5.0,
                                  neg_eig=True, beta_logits=True), {"solve_diag": "tf32x3"}),
    "diag_ieee_c32": (dict(dtype="float32", B=2, T=45, H=1, HV=1, K=16, V=16, C=32), {"solve_diag": "ieee"}),
    "diag_subst_small_blocks": (dict(dtype="float32", B=2, T=70, H=1, HV=2, K=32, V=32),
                                {"solve_diag": "subst", "solve_BK": 16, "intra_BK": 16, "gamma_BK": 16}),
}


@pytest.mark.parametrize("name", list(TRITON_KNOBS))
@pytest.mark.parametrize("backend", backends("triton"))
def test_triton_config_knobs(backend, name):
    """Each non-default value of a Triton knob the autotuner may pick computes the same function."""
    from kda_compile.api import _options
    from kda_compile.kernels_triton.chunk_fwd import chunk_kda_fwd
    case, config = TRITON_KNOBS[name]
    low, ref = case_inputs(case, device())
    kw = flags(case)
    opts = _options(low["q"], None, kw["use_qk_l2norm_in_kernel"], kw["use_gate_in_kernel"],
                    kw["use_beta_sigmoid_in_kernel"], kw["allow_neg_eigval"], kw.get("lower_bound"),
                    case.get("C", 64), kw["state_v_first"])
    o, s = chunk_kda_fwd(low["q"], low["k"], low["v"], low["g"], low["beta"], low.get("initial_state"),
                         low.get("cu_seqlens"), low.get("A_log"), low.get("dt_bias"), opts, True, config)
    ro, rs = recurrence64(ref, case)
    tol = _tol(case, "triton", GPU)
    assert finite_err(o, ro) <= tol and finite_err(s, rs) <= tol


def _tilelang_forward(low, case, config):
    """The TileLang forward called directly with a kernel config (the public API takes none)."""
    from kda_compile.api import _options
    from kda_compile.kernels_tl.chunk_fwd import chunk_kda_fwd
    kw = flags(case)
    opts = _options(low["q"], None, kw["use_qk_l2norm_in_kernel"], kw["use_gate_in_kernel"],
                    kw["use_beta_sigmoid_in_kernel"], kw["allow_neg_eigval"], kw.get("lower_bound"),
                    case.get("C", 64), kw["state_v_first"])
    return chunk_kda_fwd(low["q"], low["k"], low["v"], low["g"], low["beta"], low.get("initial_state"),
                         low.get("cu_seqlens"), low.get("A_log"), low.get("dt_bias"), opts, True, config)


@pytest.mark.parametrize("backend", backends("tilelang"))
def test_tilelang_config_knobs(backend):
    """Non-default kernel config (16 state columns per program, 128 threads) computes the same function."""
    case = dict(dtype="float32", B=1, T=50, H=1, HV=1, K=32, V=32, l2norm=True)
    low, ref = case_inputs(case, device())
    o, s = _tilelang_forward(low, case, {"state_BV": 16, "threads": 128})
    ro, rs = recurrence64(ref, case)
    tol = _tol(case, "tilelang", GPU)
    assert finite_err(o, ro) <= tol and finite_err(s, rs) <= tol


# ------------------------------------------------------------------------------- segment scan (TileLang)

# segments of 64 tokens (one chunk at C = 64, two at C = 32) so that every sequence longer than 64 is split
SEGMENTS = {
    # an empty sequence, a 1-token one, one of exactly two segments, a ragged long one
    "varlen_log_fp32": dict(dtype="float32", cu=[0, 0, 1, 129, 300], H=1, HV=2, K=32, V=32),
    "safe_vfirst_c32_fp32": dict(dtype="float32", B=2, T=150, H=1, HV=1, K=32, V=32, C=32, gate="raw",
                                 lower_bound=-5.0, state_v_first=True, l2norm=True),
    "masked_gate_fp32": dict(dtype="float32", B=1, T=200, H=1, HV=1, K=32, V=32, masked=True, h0=False, tol=3e-4),
}


@pytest.mark.parametrize("name", list(SEGMENTS))
@pytest.mark.parametrize("backend", backends("tilelang"))
def test_segment_scan_equals_the_unsplit_forward(backend, name):
    """Forced 64-token segments: outputs and final states equal the unsplit forward within float32 rounding and the
    float64 recurrence within the tolerance."""
    case = SEGMENTS[name]
    low, ref = case_inputs(case, device())
    o1, s1 = _tilelang_forward(low, case, {"segment_len": 0})
    o2, s2 = _tilelang_forward(low, case, {"segment_len": 64})
    ro, rs = recurrence64(ref, case)
    tol = _tol(case, "tilelang", GPU)
    e_split = (finite_err(o2, o1), finite_err(s2, s1))
    assert max(e_split) <= (1e-3 if GPU else 1e-5), f"split vs unsplit: {e_split}"
    assert finite_err(o2, ro) <= tol and finite_err(s2, rs) <= tol


@pytest.mark.parametrize("backend", backends("tilelang"))
def test_segment_scan_is_batch_invariant(backend):
    """A sequence cut into three segments gives the same bits alone, in a batch and in a varlen pack."""
    case = dict(dtype="float32", B=3, T=150, H=1, HV=2, K=32, V=32, l2norm=True)
    low, _ = case_inputs(case, device())
    split = {"segment_len": 64}
    o_batch, s_batch = _tilelang_forward(low, case, split)
    alone = {n: (x[1:2] if n in ("q", "k", "v", "g", "beta", "initial_state") else x) for n, x in low.items()}
    o_alone, s_alone = _tilelang_forward(alone, case, split)
    # the varlen pack: a 7-token sequence, then the sequence, then a 70-token one
    T = case["T"]
    pack = {n: torch.cat([x[0, :7], x[1], x[2, :70]])[None] for n, x in low.items()
            if n in ("q", "k", "v", "g", "beta")}
    pack.update(A_log=low.get("A_log"), dt_bias=low.get("dt_bias"), initial_state=low["initial_state"],
                cu_seqlens=torch.tensor([0, 7, 7 + T, 77 + T], device=low["q"].device))
    o_pack, s_pack = _tilelang_forward({n: x for n, x in pack.items() if x is not None}, case, split)
    assert torch.equal(o_alone[0], o_batch[1]) and torch.equal(s_alone[0], s_batch[1])
    assert torch.equal(o_alone[0], o_pack[0, 7:7 + T]) and torch.equal(s_alone[0], s_pack[1])


# -------------------------------------------------------------------------------------------------- GPU

STANDARD = [(2, 8192, 16), (1, 32768, 16), (8, 4096, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["log", "safe"])
@pytest.mark.parametrize("B,T,H", STANDARD)
@pytest.mark.parametrize("backend", backends("triton", "tilelang"))
def test_gpu_standard_shapes(backend, B, T, H, gate):
    """bf16, D = 128, q/k L2 norm in the kernel, g and beta in float32 as models produce them: relative error
    <= 5e-3 against the float64 recurrence."""
    case = dict(dtype="bfloat16", B=B, T=T, H=H, HV=H, K=128, V=128, l2norm=True, gate="log" if gate == "log" else "raw")
    if gate == "safe":
        case["lower_bound"] = -5.0
    low, ref = case_inputs(case, "cuda")
    low["g"], low["beta"] = low["g"].float(), low["beta"].float()
    o, s = _run(low, case, backend)
    ro, rs = recurrence64(ref, case)
    e_o, e_s = finite_err(o, ro), finite_err(s, rs)
    print(f"{backend} B{B} T{T} H{H} {gate}: rel err o={e_o:.2e} state={e_s:.2e}")
    assert e_o <= 5e-3 and e_s <= 5e-3


GPU_CASES = {
    "varlen_gva_bf16_k128": dict(dtype="bfloat16", cu=[0, 1, 300, 777, 1000], H=2, HV=4, K=128, V=128, l2norm=True),
    "safe_fp16_k128": dict(dtype="float16", B=2, T=333, H=2, HV=2, K=128, V=128, gate="raw", lower_bound=-5.0,
                           l2norm=True, beta_logits=True),
    "masked_fp32_k128": dict(dtype="float32", B=1, T=200, H=1, HV=2, K=128, V=128, masked=True, tol=3e-4),
    "neg_inf_fp32_k64": dict(dtype="float32", B=1, T=200, H=1, HV=2, K=64, V=64, neg_inf=True, tol=3e-4),
    "long_bf16": dict(dtype="bfloat16", B=1, T=65536, H=4, HV=4, K=128, V=128, l2norm=True, tol=1e-2),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
@pytest.mark.parametrize("backend", backends("triton", "tilelang"))
def test_gpu_cases(backend, name):
    case = GPU_CASES[name]
    low, ref = case_inputs(case, "cuda")
    o, s = _run(low, case, backend)
    ro, rs = recurrence64(ref, case)
    tol = _tol(case, backend, gpu=True)
    e_o, e_s = finite_err(o, ro), finite_err(s, rs)
    assert e_o <= tol and e_s <= tol, f"{backend} {name}: rel err o={e_o:.3g} state={e_s:.3g} > {tol:g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [("bfloat16", 5e-3), ("float16", 5e-3), ("float32", 1e-3)])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_default_dispatch_meets_the_dtype_tolerance(dtype, tol, D):
    """Whatever backend the dispatch picks by default (no tuned table needed) meets the dtype's tolerance."""
    from kda_compile import explain
    case = dict(dtype=dtype, cu=[0, 100, 101, 357], H=2, HV=4, K=D, V=D, gate="raw", l2norm=True, beta_logits=True)
    low, ref = case_inputs(case, "cuda")
    o, s = chunk_kda(**low, **flags(case), output_final_state=True)
    ro, rs = recurrence64(ref, case)
    chosen = explain(**low, **flags(case)).backend.name
    assert finite_err(o, ro) <= tol and finite_err(s, rs) <= tol, chosen


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", backends("triton", "tilelang"))
def test_gpu_causality_k128(backend, dtype):
    case = dict(dtype=dtype, B=2, T=300, H=2, HV=2, K=128, V=128, cut=137, gate="raw", lower_bound=-5.0, l2norm=True)
    low, _ = case_inputs(case, "cuda")
    before = _run(low, case, backend)[0][:, :137]
    after = _run(_redraw_after(low, case), case, backend)[0][:, :137]
    assert torch.equal(before, after)
