"""The C target's 16-bit rounding (target.round_float32_to): a tiny TileLang C kernel rounding float32 values to
bf16 / fp16 bit-exactly, compared with torch's casts (ties to even, NaN and infinities kept)."""
import pytest
import torch

pytest.importorskip("tilelang")

import tilelang  # noqa: E402
import tilelang.language as T  # noqa: E402

from kda_compile.kernels_tl.target import CPU_TARGET, ops_for, round_float32_to  # noqa: E402

N = 4096


def _rounding_kernel(dtype: str):
    @T.prim_func
    def rounded(x: T.Tensor((N,), "float32"), y: T.Tensor((N,), "float32"), z: T.Tensor((N,), "float32")):
        with T.Kernel(1, threads=1):
            for i in T.serial(N):
                y[i] = round_float32_to(x[i], dtype)
                z[i] = ops_for(CPU_TARGET).to_tile(x[i] * 1.0, dtype)   # the kernels' entry point

    return tilelang.compile(rounded, target=CPU_TARGET, out_idx=None)


def _values(low: float, high: float) -> torch.Tensor:
    """Random float32 magnitudes between 2**low and 2**high of both signs, plus halfway cases of bf16 and fp16."""
    g = torch.Generator().manual_seed(0)
    mag = torch.exp2(torch.empty(N - 64).uniform_(low, high, generator=g))
    x = mag * torch.where(torch.rand(N - 64, generator=g) < 0.5, -1.0, 1.0)
    # exact ties: a value of the 16-bit type plus half its ulp, for last kept bits even and odd (bf16 keeps 7
    # mantissa bits, fp16 10), so ties to even rounds some down and some up
    ties = []
    for bits in (7, 10):
        base = torch.tensor([1.0, 1.5, 3.0, 0.75, 100.0, -7.0, 1.25 * 2.0 ** -10, -250.0])
        base = torch.cat([base, base * (1 + 2.0 ** -bits)])   # the odd neighbours
        _, exp = torch.frexp(base)                             # |base| in [2**(exp-1), 2**exp)
        ties.append(base + base.sign() * torch.exp2((exp - 2 - bits).float()))
    ties = torch.cat(ties)
    return torch.cat([x, ties, torch.zeros(64 - len(ties))]).float()


@pytest.mark.parametrize("dtype,torch_dtype,low,high", [("bfloat16", torch.bfloat16, -100.0, 100.0),
                                                        ("float16", torch.float16, -14.0, 15.0)])
def test_round_float32_to_matches_torch(dtype, torch_dtype, low, high):
    """bf16 over a wide range; fp16 within its normal range (its overflow and subnormals are not emulated)."""
    x = _values(low, high)
    if dtype == "bfloat16":
        x[-4:] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    y, z = torch.empty_like(x), torch.empty_like(x)
    _rounding_kernel(dtype)(x, y, z)
    want = x.to(torch_dtype).float()
    torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(z, want, rtol=0, atol=0, equal_nan=True)
    assert (y != x).any()   # the values are not all representable already


def test_round_float32_to_float32_is_identity():
    """Every other dtype is left alone (float32 tiles of float32 calls)."""
    x = _values(-100.0, 100.0)
    y, z = torch.empty_like(x), torch.empty_like(x)
    _rounding_kernel("float32")(x, y, z)
    assert torch.equal(y, x) and torch.equal(z, x)


def test_bf16_forward_rounds_on_the_cpu():
    """On the C target a bf16 call is not the float32 call on the same (bf16-exact) values: its tile operands and
    stored intermediates are rounded to bf16 as on the GPU.  The final state (float32 in both) tells them apart,
    and stays close to the float32 one."""
    from kda_compile import chunk_kda
    from kernel_cases import case_inputs, flags
    case = dict(dtype="bfloat16", B=1, T=64, H=1, HV=1, K=32, V=32)
    low, _ = case_inputs(case, "cpu")
    wide = {n: x.float() if n in ("q", "k", "v", "g", "beta") else x for n, x in low.items()}
    _, s16 = chunk_kda(**low, **flags(case), output_final_state=True, backend="tilelang")
    _, s32 = chunk_kda(**wide, **flags(case), output_final_state=True, backend="tilelang")
    assert not torch.equal(s16, s32)
    assert ((s16 - s32).norm() / s32.norm()).item() < 3e-2
