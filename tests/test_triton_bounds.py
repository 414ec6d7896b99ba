"""No Triton kernel of the package loads or stores outside its tensor arguments (tests/triton_bounds.py), in the
interpreter, on the inputs where that goes wrong: ragged chunks, empty and one-token sequences in a varlen pack,
grouped value heads, chunk 32, every prologue flag, the training forward and both backward paths, and the state
pool with padding slots.  On a GPU such an access is an illegal address at best and silent garbage at worst."""
import os

import pytest
import torch

from kda_compile import chunk_kda, fused_recurrent_kda

from kda_inputs import make_inputs
from triton_bounds import checked_accesses

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                                reason="checks the interpreter's accesses (conftest turns it on without a GPU)")

D = 16


def test_the_check_finds_a_read_past_the_input():
    import triton
    import triton.language as tl

    @triton.jit
    def copy(x, y, N: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(y + o, tl.load(x + o))

    x, y = torch.ones(8), torch.zeros(16)
    with checked_accesses() as counts:
        copy[(1,)](x, y, N=8)                      # inside both: fine
        assert counts == {"launches": 1, "accesses": 2}
        with pytest.raises(Exception, match="OutOfBoundsAccess.*copy: a load of 8 element"):
            copy[(1,)](x, y, N=16)
    assert torch.equal(y[:8], x)


CHUNK_CASES = {
    "ragged_gva": dict(B=2, T=70, H=1, HV=2),
    "varlen_empty_one_token_c32": dict(cu_seqlens=[0, 1, 40, 40, 77], H=2, HV=2, chunk_size=32),
    "bf16_ragged_gva": dict(B=2, T=70, H=1, HV=2, dtype=torch.bfloat16),
    "gate_l2_sigmoid_safe": dict(B=1, T=45, H=1, HV=2, gate="raw", beta_logits=True,
                                 flags=dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                                            use_beta_sigmoid_in_kernel=True, lower_bound=-5.0)),
}


@pytest.mark.parametrize("name", list(CHUNK_CASES))
def test_chunk_training_stays_inside_its_tensors(name):
    """Inference forward, then the training forward that keeps X and aqk and its backward (from the kept tensors),
    then the backward that recomputes them, every launch checked."""
    from kda_compile.kernels_triton.chunk_bwd import chunk_kda_bwd
    case = dict(CHUNK_CASES[name])
    flags = case.pop("flags", {})
    chunk_size = case.pop("chunk_size", 64)
    a = make_inputs(K=D, V=D, seed=0, **{"dtype": torch.float32, **case})
    if "initial_state" in a:
        a["initial_state"] = a["initial_state"].float()
    names = [n for n in ("q", "k", "v", "g", "beta", "initial_state", "A_log", "dt_bias") if n in a]
    opts = dict(flags, chunk_size=chunk_size, cu_seqlens=a.get("cu_seqlens"), output_final_state=True,
                backend="triton")
    with checked_accesses() as counts:
        with torch.no_grad():
            chunk_kda(**{n: a[n] for n in names}, **opts)
        leaves = {n: a[n].clone().requires_grad_(True) for n in names}
        o, ht = chunk_kda(**leaves, **opts)
        (o.square().mean() + ht.square().mean()).backward()
        from kda_compile.api import _options
        cfg = _options(a["q"], None, flags.get("use_qk_l2norm_in_kernel", False),
                       flags.get("use_gate_in_kernel", False), flags.get("use_beta_sigmoid_in_kernel", False),
                       False, flags.get("lower_bound"), chunk_size, False)
        chunk_kda_bwd(a["q"], a["k"], a["v"], a["g"], a["beta"], a["initial_state"], a.get("cu_seqlens"),
                      a.get("A_log"), a.get("dt_bias"), cfg, torch.randn_like(a["v"]), torch.randn_like(ht))
    assert counts["launches"] >= 20 and counts["accesses"] > 1000, counts   # 26 launches today
    assert all(torch.isfinite(leaves[n].grad).all() for n in names)


def test_state_pools_with_padding_slots_stay_inside_their_tensors():
    """Decode with a pool, padding slots, speculative rows and the in-place update; a mixed prefill + decode pack
    through chunk_kda's pool."""
    a = make_inputs(B=3, T=1, H=1, HV=2, K=D, V=D, dtype=torch.float32, initial_state=False, seed=1)
    pool = torch.randn(5, 2, D, D)
    with torch.inference_mode(), checked_accesses() as counts:
        fused_recurrent_kda(**a, initial_state=pool, ssm_state_indices=torch.tensor([4, -1, 0], dtype=torch.int32),
                            inplace_final_state=True, backend="triton")
        s = make_inputs(B=2, T=3, H=1, HV=2, K=D, V=D, dtype=torch.float32, initial_state=False, seed=2)
        fused_recurrent_kda(**s, initial_state=pool, ssm_state_indices=torch.tensor([[1, 2, 3], [-1, -1, -1]]),
                            num_accepted_tokens=torch.tensor([2, 1]), inplace_final_state=True, backend="triton")
        m = make_inputs(H=1, HV=2, K=D, V=D, dtype=torch.float32, initial_state=False, cu_seqlens=[0, 1, 70, 71],
                        seed=3)
        chunk_kda(**m, initial_state=pool, ssm_state_indices=torch.tensor([2, -1, 3], dtype=torch.int32),
                  inplace_final_state=True, backend="triton")
    assert counts["launches"] >= 5 and counts["accesses"] > 100, counts     # 9 launches today
