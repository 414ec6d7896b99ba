"""Plain eager inference runs the ops' kernel bodies directly (kda_compile.ops.eager_inference); everything that
needs the dispatcher (autograd, torch.compile, profiling, dispatch modes, tensor subclasses) still goes through
the ``kda_compile::`` ops, and both routes give the same bits."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kda_compile import chunk_kda, fused_recurrent_kda, ops

from kda_inputs import make_inputs


class PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing: under it a call must go through the ``kda_compile::`` op."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("call", ["chunk", "recurrent", "recurrent_in_place"])
def test_the_direct_route_and_the_op_give_the_same_bits(call):
    x = make_inputs(B=2, T=37 if call == "chunk" else 1, dtype=torch.float32)
    state = x.pop("initial_state")

    def run():
        s = state.clone()
        if call == "chunk":
            return chunk_kda(**x, initial_state=s, output_final_state=True)
        if call == "recurrent":
            return fused_recurrent_kda(**x, initial_state=s, output_final_state=True)
        o, _ = fused_recurrent_kda(**x, initial_state=s, inplace_final_state=True)
        return o, s

    with torch.inference_mode():
        assert ops.eager_inference(tuple(x.values()) + (state,), False)
        direct = run()
        with PassThrough() as mode:
            via_op = run()
    assert any(name.startswith("kda_compile.") for name in mode.seen), mode.seen[:5]
    assert torch.equal(direct[0], via_op[0]) and torch.equal(direct[1], via_op[1])


def test_the_direct_route_is_refused_when_the_dispatcher_is_needed():
    x = make_inputs(B=1, T=5, dtype=torch.float32)
    tensors = tuple(x.values())
    assert ops.eager_inference(tensors, False)
    assert not ops.eager_inference(tensors, True)                      # a gradient to record
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert not ops.eager_inference(tensors, False)                 # the profiler shows the op's name
    with TorchDispatchMode():
        assert not ops.eager_inference(tensors, False)                 # a dispatch mode sees the op
    assert not ops.eager_inference((x["q"].to("meta"),), False)        # meta tensors use the fake kernel

    class Sub(torch.Tensor):
        pass
    assert not ops.eager_inference((x["q"].as_subclass(Sub),), False)  # tensor subclasses dispatch


def test_a_profiled_call_shows_the_op():
    x = make_inputs(B=1, T=5, dtype=torch.float32)
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        chunk_kda(**x)
    assert any("kda_compile::chunk_kda_fwd" in e.name for e in prof.events())


def test_an_in_place_update_under_no_grad_bumps_the_state_version():
    x = make_inputs(B=2, T=1, dtype=torch.float32)
    state = x.pop("initial_state").clone()
    before = state._version
    with torch.no_grad():
        fused_recurrent_kda(**x, initial_state=state, inplace_final_state=True)
    assert state._version > before


@pytest.mark.parametrize("grad", [False, True])
def test_grad_and_inference_give_the_same_forward(grad):
    x = make_inputs(B=1, T=20, dtype=torch.float32, requires_grad=grad)
    o, _ = chunk_kda(**x)
    with torch.inference_mode():
        o2, _ = chunk_kda(**{k: v.detach() for k, v in x.items()})
    assert o.requires_grad == grad and torch.equal(o.detach(), o2)
