"""``chunk_kda`` over a mixed prefill + decode pack with the states in a pool (``ssm_state_indices``,
``inplace_final_state``): every sequence must get, bit for bit, what ``chunk_kda`` on it alone gives;
negative slots (padding) skip their sequence.  Reference backend, and the Triton kernels (on the GPU when there
is one, else on the CPU under Triton's interpreter, which tests/conftest.py turns on without a GPU).  The
argument checks run on CPU tensors, whose values are read without a device sync."""
import pytest
import torch

from kda_compile import chunk_kda, explain
from kda_compile.reference import kda_reference

from kda_inputs import make_inputs, rel_err

LENGTHS = [1, 1000, 1, 37, 1]     # decode tokens next to a long prefill
BACKENDS = ["reference", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # where the kernel cases run


def _device(backend: str) -> str:
    """The kernels' cases run on the GPU when there is one.  The reference backend's bit-for-bit case runs on
    the CPU: on CUDA its products go through cuBLAS, which picks its algorithm per matrix shape, so a sequence
    alone and in a pack agree in the math but not always in the bits (H200: the pack differed from the call
    alone)."""
    return "cpu" if backend == "reference" else DEVICE


def _pack(lengths, pool_size, dtype, gate="log", device="cpu"):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    args = make_inputs(H=1, HV=2, K=16, V=16, dtype=dtype, cu_seqlens=cu, initial_state=False, gate=gate,
                       device=device)
    pool = torch.randn(pool_size, 2, 16, 16, dtype=torch.float32).mul_(0.5).to(device)
    return args, pool, cu


def _alone(args, cu, n, h0, backend, **kw):
    s, e = cu[n], cu[n + 1]
    one = {k: (x[:, s:e] if k in ("q", "k", "v", "g", "beta") else x) for k, x in args.items() if k != "cu_seqlens"}
    return chunk_kda(**one, initial_state=h0.unsqueeze(0).clone(), output_final_state=True, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_pack_equals_each_sequence_alone(backend, inplace):
    args, pool, cu = _pack(LENGTHS, pool_size=8, dtype=torch.float32, device=_device(backend))
    slots = torch.tensor([6, 0, 3, 7, 2], dtype=torch.int32, device=_device(backend))
    before = pool.clone()
    with torch.inference_mode():
        o, final = chunk_kda(**args, initial_state=pool, ssm_state_indices=slots, output_final_state=True,
                             inplace_final_state=inplace, backend=backend)
        assert (final is None) == inplace
        for n, slot in enumerate(slots.tolist()):
            o1, f1 = _alone(args, cu, n, before[slot], backend)
            assert torch.equal(o[:, cu[n]:cu[n + 1]], o1), f"sequence {n}: output differs from the call alone"
            got = pool[slot] if inplace else final[n]
            assert torch.equal(got, f1[0]), f"sequence {n}: final state differs from the call alone"
    untouched = [s for s in range(8) if s not in slots.tolist()]
    assert torch.equal(pool[untouched], before[untouched])
    if not inplace:
        assert torch.equal(pool, before)
    # and the numbers are right: against the float64 reference on each sequence
    h0 = before[slots.long()].double()
    ref_o, _ = kda_reference(*(args[k].double() for k in ("q", "k", "v", "g", "beta")), h0,
                             args["cu_seqlens"])
    err = rel_err(o, ref_o)
    assert err < 1e-5, f"rel err {err:.2e} against the float64 reference"


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_slot_skips_the_sequence(backend):
    args, pool, cu = _pack([1, 40, 1], pool_size=4, dtype=torch.float32, device=DEVICE)
    slots = torch.tensor([2, -1, 0], dtype=torch.int32, device=DEVICE)
    before = pool.clone()
    with torch.inference_mode():
        o, _ = chunk_kda(**args, initial_state=pool, ssm_state_indices=slots, inplace_final_state=True,
                         backend=backend)
        assert torch.equal(o[:, cu[1]:cu[2]], torch.zeros_like(o[:, cu[1]:cu[2]]))
        for n in (0, 2):
            o1, f1 = _alone(args, cu, n, before[slots[n]], backend)
            assert torch.equal(o[:, cu[n]:cu[n + 1]], o1)
            assert torch.equal(pool[slots[n]], f1[0])
    assert torch.equal(pool[[1, 3]], before[[1, 3]])


def test_dense_batch_with_pool_and_gate_in_kernel():
    """Dense [B, T] batch, raw gate computed in the kernel, state_v_first pool: pool slots in and out."""
    args = make_inputs(B=3, T=20, H=2, K=16, V=16, dtype=torch.float32, gate="raw", initial_state=False)
    pool = torch.randn(5, 2, 16, 16) * 0.5
    slots = torch.tensor([4, 1, 2])
    before = pool.clone()
    with torch.inference_mode():
        o, f = chunk_kda(**args, initial_state=pool, ssm_state_indices=slots, output_final_state=True,
                         use_gate_in_kernel=True, state_v_first=True)
        o1, f1 = chunk_kda(**args, initial_state=before[slots].clone(), output_final_state=True,
                           use_gate_in_kernel=True, state_v_first=True)
    assert torch.equal(o, o1) and torch.equal(f, f1)


def test_inplace_without_pool_updates_the_state():
    args = make_inputs(B=2, T=10, dtype=torch.float32)
    state = args.pop("initial_state")
    with torch.inference_mode():
        o1, f1 = chunk_kda(**args, initial_state=state.clone(), output_final_state=True)
        o, f = chunk_kda(**args, initial_state=state, inplace_final_state=True)
    assert f is None and torch.equal(o, o1) and torch.equal(state, f1)


def test_pool_arguments_are_checked():
    args, pool, cu = _pack([1, 5], pool_size=3, dtype=torch.float32)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="must lie in"):
            chunk_kda(**args, initial_state=pool, ssm_state_indices=torch.tensor([0, 3]))
        with pytest.raises(ValueError, match="repeats slot"):
            chunk_kda(**args, initial_state=pool, ssm_state_indices=torch.tensor([1, 1]), inplace_final_state=True)
        chunk_kda(**args, initial_state=pool, ssm_state_indices=torch.tensor([1, 1]))  # read twice: fine
        with pytest.raises(ValueError, match=r"shape \[N\]"):
            chunk_kda(**args, initial_state=pool, ssm_state_indices=torch.tensor([[0, 1], [1, 2]]))
        with pytest.raises(TypeError, match="float32"):
            chunk_kda(**args, initial_state=pool.half(), ssm_state_indices=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="contiguous"):
            chunk_kda(**args, initial_state=pool.transpose(-1, -2), ssm_state_indices=torch.tensor([0, 1]),
                      inplace_final_state=True)
        with pytest.raises(ValueError, match="return_intermediate_states"):
            chunk_kda(**args, initial_state=pool, ssm_state_indices=torch.tensor([0, 1]),
                      return_intermediate_states=True)
    with pytest.raises(ValueError, match="inference only"):
        grad = {k: (x.requires_grad_(True) if k == "q" else x) for k, x in args.items()}
        chunk_kda(**grad, initial_state=pool, ssm_state_indices=torch.tensor([0, 1]))


def test_backend_without_pool_support_falls_back_with_a_reason():
    from kda_compile import dispatch
    args, pool, cu = _pack([1, 5], pool_size=3, dtype=torch.float32)
    dispatch.register_backend(dispatch.Backend(name="no_pool", supports=lambda call: None,
                                               run=lambda call, config: (_ for _ in ()).throw(AssertionError)),
                              before="reference")
    try:
        choice = explain(**args, initial_state=pool, ssm_state_indices=torch.tensor([0, 1]))
        assert choice.backend.name == "reference"
        assert "state pool" in choice.rejected["no_pool"]
        with pytest.raises(ValueError, match="state pool"):
            explain(**args, initial_state=pool, ssm_state_indices=torch.tensor([0, 1]), backend="no_pool")
        # pooled decode: by default only backends that skip padding slots; named, it runs
        decode = explain(**args, op="recurrent", initial_state=pool, ssm_state_indices=torch.tensor([0, 1]))
        assert decode.backend.name == "reference" and "padding" in decode.rejected["no_pool"]
        forced = explain(**args, op="recurrent", initial_state=pool, ssm_state_indices=torch.tensor([0, 1]),
                         backend="no_pool")
        assert forced.backend.name == "no_pool"
    finally:
        dispatch.unregister_backend("no_pool")
