"""The public API on a CUDA device, whatever backend the dispatch picks, against the float64 recurrence."""
import pytest
import torch

from kda_compile import chunk_kda, explain, fused_recurrent_kda

from kda_inputs import make_inputs, rel_err
from test_api import recurrence, split

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-3), (torch.float16, 5e-3), (torch.float32, 1e-3)])
@pytest.mark.parametrize("D", [64, 128])
def test_default_dispatch_on_cuda(dtype, tol, D):
    args = make_inputs(H=2, HV=4, K=D, V=D, dtype=dtype, device="cuda", cu_seqlens=[0, 100, 101, 357],
                       gate="raw", beta_logits=True)
    flags = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)
    (q, k, v, g, beta), rest = split(args)
    o, s = chunk_kda(q, k, v, g, beta, output_final_state=True, **flags, **rest)
    ref_o, ref_s = recurrence({n: (x.cpu() if isinstance(x, torch.Tensor) else x) for n, x in args.items()}, **flags)
    chosen = explain(q, k, v, g, beta, **flags, **rest).backend.name
    assert rel_err(o.cpu(), ref_o) < tol, chosen
    assert rel_err(s.cpu(), ref_s) < tol, chosen


def test_decode_on_cuda():
    args = make_inputs(B=8, T=1, H=4, K=128, V=128, dtype=torch.bfloat16, device="cuda")
    (q, k, v, g, beta), rest = split(args)
    o, s = fused_recurrent_kda(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True, **rest)
    ref_o, ref_s = recurrence({n: x.cpu() for n, x in args.items()}, use_qk_l2norm_in_kernel=True)
    assert rel_err(o.cpu(), ref_o) < 5e-3 and rel_err(s.cpu(), ref_s) < 5e-3


@pytest.mark.parametrize("cu", [None, [0, 100, 101, 357]])
def test_intermediate_states_on_cuda(cu):
    """return_intermediate_states on the GPU runs the chosen kernel backend (not the reference) and matches
    the float64 chunk states."""
    from kda_compile.reference import kda_reference_chunk_states
    from kda_compile.api import _options

    args = make_inputs(B=1 if cu else 2, T=357 if cu else 200, H=2, HV=4, K=128, V=128, dtype=torch.bfloat16,
                       device="cuda", cu_seqlens=cu)
    (q, k, v, g, beta), rest = split(args)
    with torch.inference_mode():
        o, s, h = chunk_kda(q, k, v, g, beta, output_final_state=True, return_intermediate_states=True, **rest)
    cpu = {n: x.cpu().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else
           (x.cpu() if isinstance(x, torch.Tensor) else x) for n, x in args.items()}
    opts = _options(q, None, False, False, False, False, None, 64, False)
    ro, rs, rh = kda_reference_chunk_states(cpu["q"], cpu["k"], cpu["v"], cpu["g"], cpu["beta"],
                                           cpu.get("initial_state"), cpu.get("cu_seqlens"), None, None, opts)
    assert explain(q, k, v, g, beta, **rest).backend.name != "reference"
    assert h.shape == rh.shape
    assert rel_err(o.cpu(), ro) < 5e-3 and rel_err(s.cpu(), rs) < 5e-3 and rel_err(h.cpu(), rh) < 5e-3
