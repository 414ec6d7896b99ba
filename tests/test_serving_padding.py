"""Serving inputs to ``fused_recurrent_kda``: padding slots (negative ``ssm_state_indices``) skip their
sequence on every backend (nothing read from or written to the pool, zero output), and bad pool arguments
fail with a clear error before any kernel runs.  The kernel cases run on the GPU when there is one (Triton runs
under its interpreter without one, TileLang on its C target); the argument checks use CPU tensors, whose values
are read without a sync."""
import pytest
import torch

from kda_compile import fused_recurrent_kda

from kda_inputs import make_inputs
from kernel_cases import backends

BACKENDS = backends()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # where the kernel cases run
D = 32   # head dims: the smallest TileLang compiles


def _decode(B=4, T=1, pool_size=6, cu=None, device="cpu"):
    args = make_inputs(B=B, T=T, H=1, HV=2, K=D, V=D, dtype=torch.float32, initial_state=False, cu_seqlens=cu,
                       device=device)
    pool = torch.randn(pool_size, 2, D, D).mul_(0.5).to(device)
    return args, pool


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_slot_skips_the_sequence(backend):
    args, pool = _decode(device=DEVICE)
    slots = torch.tensor([3, -1, 0, -1], dtype=torch.int32, device=DEVICE)
    before = pool.clone()
    with torch.no_grad():
        o, _ = fused_recurrent_kda(**args, initial_state=pool, ssm_state_indices=slots, inplace_final_state=True,
                                   backend=backend)
        live = [0, 2]
        one = {k: x[live] for k, x in args.items()}
        o1, f1 = fused_recurrent_kda(**one, initial_state=before[[3, 0]].clone(), output_final_state=True,
                                     backend=backend)
    assert torch.equal(o[[1, 3]], torch.zeros_like(o[[1, 3]]))
    assert torch.allclose(o[live], o1, rtol=1e-6, atol=1e-6)
    assert torch.allclose(pool[[3, 0]], f1, rtol=1e-6, atol=1e-6)
    assert torch.equal(pool[[1, 2, 4, 5]], before[[1, 2, 4, 5]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_slot_without_inplace_gives_zero_state(backend):
    args, pool = _decode(B=2, device=DEVICE)
    before = pool.clone()
    with torch.no_grad():
        o, f = fused_recurrent_kda(**args, initial_state=pool, ssm_state_indices=torch.tensor([-1, 4], device=DEVICE),
                                   output_final_state=True, backend=backend)
    assert torch.equal(o[0], torch.zeros_like(o[0])) and torch.equal(f[0], torch.zeros_like(f[0]))
    assert torch.equal(pool, before) and f[1].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_speculative_padding_row_and_padding_columns(backend):
    """2-D indices: a row whose initial slot is negative is skipped; negative slots of unused draft tokens in
    a live row are not written."""
    cu = [0, 3, 5, 8]
    args, pool = _decode(cu=cu, pool_size=12, device=DEVICE)
    idx = torch.tensor([[0, 1, 2], [-1, -1, -1], [6, 7, -1]], device=DEVICE)
    accepted = torch.tensor([2, 1, 1], device=DEVICE)
    before = pool.clone()
    with torch.no_grad():
        o, _ = fused_recurrent_kda(**args, initial_state=pool, ssm_state_indices=idx,
                                   num_accepted_tokens=accepted, inplace_final_state=True, backend=backend)
    assert torch.equal(o[:, 3:5], torch.zeros_like(o[:, 3:5]))
    # row 0 reads slot 1 and writes 0, 1, 2; row 2 reads slot 6 and writes 6, 7 (its third token: padding)
    assert not torch.equal(pool[[0, 2, 7]], before[[0, 2, 7]])
    assert torch.equal(pool[[3, 4, 5, 8, 9, 10, 11]], before[[3, 4, 5, 8, 9, 10, 11]])


def test_bad_pool_arguments_fail_before_running():
    args, pool = _decode(B=2)
    with torch.no_grad():
        with pytest.raises(ValueError, match="repeats slot"):
            fused_recurrent_kda(**args, initial_state=pool, ssm_state_indices=torch.tensor([2, 2]),
                                inplace_final_state=True)
        with pytest.raises(ValueError, match="must lie in"):
            fused_recurrent_kda(**args, initial_state=pool, ssm_state_indices=torch.tensor([0, 6]))
        with pytest.raises(TypeError, match="float32"):
            fused_recurrent_kda(**args, initial_state=pool.to(torch.bfloat16), ssm_state_indices=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"shape \[N, HV, K, V\]"):
            fused_recurrent_kda(**args, initial_state=pool[:, :1], ssm_state_indices=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="contiguous"):
            fused_recurrent_kda(**args, initial_state=pool.transpose(-1, -2), ssm_state_indices=torch.tensor([0, 1]),
                                inplace_final_state=True)
        cu = [0, 1, 3]
        spec, pool = _decode(cu=cu, pool_size=8)
        with pytest.raises(ValueError, match=r"num_accepted_tokens\[0\] = 2 is larger than the 1 tokens"):
            fused_recurrent_kda(**spec, initial_state=pool, ssm_state_indices=torch.tensor([[0, 1], [2, 3]]),
                                num_accepted_tokens=torch.tensor([2, 1]), inplace_final_state=True)


@pytest.mark.parametrize("slots, written, error", [
    ([3, -1, 0], True, None), ([-1, -1], True, None), ([2, 2], True, r"repeats slot\(s\) \[2\]"),
    ([2, 2], False, None), ([0, 8], False, r"lie in \[0, 8\).*maximum of 8"), ([[0, 1], [1, -1]], True, "repeats"),
])
def test_slot_checks_agree_for_small_and_large_index_tensors(slots, written, error):
    """Small CPU index tensors are checked as Python lists, others with tensor ops: same verdict, same message."""
    from kda_compile import checks
    small = torch.tensor(slots)
    # the same values padded with -1 (padding) past the list path's size
    large = torch.cat([small.flatten(), torch.full((checks._SMALL + 1,), -1)])
    for t in (small, large):
        if error is None:
            checks.check_slot_values(t, 8, written)
        else:
            with pytest.raises(ValueError, match=error):
                checks.check_slot_values(t, 8, written)
