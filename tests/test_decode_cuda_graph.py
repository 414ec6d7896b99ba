"""Decode steps under CUDA graphs: the hybrid model's decode step captured by hand and under
``torch.compile(mode="reduce-overhead")``, and the pooled in-place decode call captured alone; each replay
must equal the eager call.  GPU only (CUDA graphs need CUDA)."""
import pytest
import torch

from kda_compile import fused_recurrent_kda
from kda_compile.model import HybridConfig, HybridModel

from kda_inputs import rel_err
from kernel_cases import backends

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(dtype=torch.float32, B=4, context=24):
    torch.manual_seed(0)
    model = HybridModel(HybridConfig.tiny(num_v_heads=4)).to(device="cuda", dtype=dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (B, context + 3), device="cuda")
    return model, ids


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_model_decode_step_in_a_captured_graph(dtype, tol):
    model, ids = _model(dtype)
    with torch.inference_mode():
        _, cache = model.forward_cached(ids[:, :-3], None)
        token = ids[:, -3:-2].clone()
        for _ in range(2):
            model.forward_cached(token, cache)           # warm-up outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_logits, g_cache = model.forward_cached(token, cache)
        for t in (-3, -2, -1):                           # new tokens through the static input buffer
            token.copy_(ids[:, t:t + 1 if t < -1 else None])
            graph.replay()
            logits, new = model.forward_cached(token, cache)
            assert rel_err(g_logits, logits) < tol, t
            for a, b in zip(g_cache.flatten(), new.flatten()):
                assert a.shape == b.shape and rel_err(a, b) < tol


def test_model_decode_under_reduce_overhead():
    model, ids = _model()
    torch._dynamo.reset()
    step = torch.compile(model.forward_cached, mode="reduce-overhead", fullgraph=True)
    with torch.inference_mode():
        _, cache = model.forward_cached(ids[:, :-3], None)
        _, ccache = model.forward_cached(ids[:, :-3], None)
        for t in (-3, -2, -1):
            token = ids[:, t:t + 1 if t < -1 else None]
            logits, cache = model.forward_cached(token, cache)
            clogits, ccache = step(token, ccache)
            ccache = type(ccache)([tuple(x.clone() for x in layer) for layer in ccache.layers])  # graph outputs
            assert rel_err(clogits, logits) < 1e-4, t


@pytest.mark.parametrize("backend", backends("triton", "tilelang"))   # the kernels that skip padding slots
def test_pooled_inplace_decode_in_a_captured_graph(backend):
    N, P, H, D = 8, 12, 4, 64
    torch.manual_seed(0)
    q, k, v = (torch.randn(N, 1, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = -torch.rand(N, 1, H, D, device="cuda").to(torch.bfloat16)
    beta = torch.rand(N, 1, H, device="cuda").to(torch.bfloat16)
    pool = torch.randn(P, H, D, D, device="cuda") * 0.1
    slots = torch.tensor([3, -1, 0, 7, 11, -1, 5, 2], device="cuda", dtype=torch.int32)
    eager_pool = pool.clone()
    with torch.inference_mode():
        o_eager, _ = fused_recurrent_kda(q, k, v, g, beta, initial_state=eager_pool, ssm_state_indices=slots,
                                         inplace_final_state=True, use_qk_l2norm_in_kernel=True, backend=backend)
        warm = pool.clone()
        fused_recurrent_kda(q, k, v, g, beta, initial_state=warm, ssm_state_indices=slots,
                            inplace_final_state=True, use_qk_l2norm_in_kernel=True, backend=backend)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o_graph, _ = fused_recurrent_kda(q, k, v, g, beta, initial_state=pool, ssm_state_indices=slots,
                                             inplace_final_state=True, use_qk_l2norm_in_kernel=True, backend=backend)
        before = pool.clone()
        graph.replay()
    assert torch.equal(o_graph, o_eager) and torch.equal(pool, eager_pool)
    assert torch.equal(o_graph[[1, 5]], torch.zeros_like(o_graph[[1, 5]]))
    untouched = [1, 4, 6, 8, 9, 10]
    assert torch.equal(pool[untouched], before[untouched])
