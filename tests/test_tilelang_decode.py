"""TileLang decode kernel (kda_compile.kernels_tl.fused_recurrent) against the float64 recurrence.

CPU cases use TileLang's C target at small sizes; GPU cases the CUDA build at serving shapes.
"""
import pytest
import torch

pytest.importorskip("tilelang")

import kda_compile  # noqa: E402
from tilelang_cases import inputs, recurrence64, rel_err  # noqa: E402

CPU_TOL = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]


def run_decode(a, **kw):
    kw.setdefault("initial_state", a.get("initial_state"))
    return kda_compile.fused_recurrent_kda(a["q"], a["k"], a["v"], a["g"], a["beta"], A_log=a.get("A_log"),
                                           dt_bias=a.get("dt_bias"), cu_seqlens=a.get("cu_seqlens"),
                                           backend="tilelang", **kw)


@pytest.mark.parametrize("dtype,tol", CPU_TOL)
@pytest.mark.parametrize("T", [1, 3])
def test_decode_tokens_gva(dtype, tol, T):
    a = inputs(dtype, B=3, T=T, H=1, HV=2, K=32, V=32)
    o, ht = run_decode(a, output_final_state=True, use_qk_l2norm_in_kernel=True)
    ro, rh = recurrence64(a, use_qk_l2norm_in_kernel=True)
    assert rel_err(o, ro) < tol and rel_err(ht, rh) < tol


@pytest.mark.parametrize("layout", ["column", "tile"])
def test_decode_flags_varlen_state_v_first(layout):
    """Safe gate + beta logits + state [N, HV, V, K], packed sequences of 2, 0 and 1 tokens; both kernel
    layouts (thread per column, reduction over a tile)."""
    from kda_compile.api import _options
    from kda_compile.kernels_tl.fused_recurrent import fused_recurrent_fwd

    a = inputs(torch.float32, cu_seqlens=[0, 2, 2, 3], H=2, K=32, V=64, gate="raw", beta_logits=True,
               state_v_first=True)
    kw = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, lower_bound=-5.0,
              use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True, state_v_first=True)
    opts = _options(a["q"], None, True, True, True, True, -5.0, 64, True)
    o, ht = fused_recurrent_fwd(a["q"], a["k"], a["v"], a["g"], a["beta"], a["initial_state"], a["cu_seqlens"],
                                a["A_log"], a["dt_bias"], opts, True,
                                config={"layout": layout, "block_V": 32, "threads": 32})
    ro, rh = recurrence64(a, **kw)
    assert rel_err(o, ro) < 1e-5 and rel_err(ht, rh) < 1e-5


def test_decode_inplace_state_pool():
    """Continuous batching: sequence n reads and updates pool slot idx[n] in place; other slots untouched."""
    a = inputs(torch.float32, B=2, T=1, H=2, K=32, V=32, initial_state=False)
    pool = torch.randn(5, 2, 32, 32)
    idx = torch.tensor([3, 0], dtype=torch.int32)
    before = pool.clone()
    o, _ = run_decode(a, initial_state=pool, ssm_state_indices=idx, inplace_final_state=True)
    ref_in = dict(a, initial_state=before[idx.long()])
    ro, rh = recurrence64(ref_in)
    assert rel_err(o, ro) < 1e-5
    assert rel_err(pool[idx.long()], rh) < 1e-5
    untouched = [1, 2, 4]
    assert torch.equal(pool[untouched], before[untouched])


def test_decode_speculative_falls_back():
    """2-D state indices (speculative decoding) are not in the kernel: backend='tilelang' says why."""
    a = inputs(torch.float32, B=2, T=2, H=1, K=32, V=32, initial_state=False)
    pool = torch.zeros(4, 1, 32, 32)
    with pytest.raises(ValueError, match="speculative"):
        run_decode(a, initial_state=pool, ssm_state_indices=torch.tensor([[0, 1], [2, 3]]),
                   num_accepted_tokens=torch.tensor([1, 2]), inplace_final_state=True)


# ---------------------------------------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-3), (torch.float32, 1e-5)])
def test_gpu_decode(B, dtype, tol):
    a = inputs(dtype, "cuda", B=B, T=1, H=32, K=128, V=128)
    o, ht = run_decode(a, output_final_state=True, use_qk_l2norm_in_kernel=True)
    ro, rh = recurrence64(a, use_qk_l2norm_in_kernel=True)
    assert rel_err(o, ro) < tol and rel_err(ht, rh) < tol


@pytest.mark.gpu
@gpu
def test_gpu_decode_inplace_pool():
    a = inputs(torch.bfloat16, "cuda", B=8, T=1, H=4, K=128, V=128, initial_state=False)
    pool = torch.randn(16, 4, 128, 128, device="cuda")
    idx = torch.randperm(16, device="cuda")[:8].int()
    before = pool.clone()
    o, _ = run_decode(a, initial_state=pool, ssm_state_indices=idx, inplace_final_state=True,
                      use_qk_l2norm_in_kernel=True)
    ro, rh = recurrence64(dict(a, initial_state=before[idx.long()]), use_qk_l2norm_in_kernel=True)
    assert rel_err(o, ro) < 5e-3 and rel_err(pool[idx.long()], rh) < 5e-3
