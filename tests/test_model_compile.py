"""torch.compile(fullgraph=True) of the hybrid model: 0 graph breaks for prefill and for a decode step, and
compiled outputs equal eager ones (CPU here; the same on CUDA under the gpu marker)."""
import pytest
import torch

from kda_compile.generation import compiled_step
from kda_compile.model import HybridCache, HybridConfig, HybridModel

from kda_inputs import one_cpu_thread, rel_err  # noqa: F401  (autouse fixture)


def setup(device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = HybridModel(HybridConfig.tiny(num_v_heads=4)).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 37), device=device)
    return model, ids


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_prefill_and_decode_trace_without_graph_breaks(device):
    model, ids = setup(device)
    torch._dynamo.reset()
    with torch.no_grad():
        prefill = torch._dynamo.explain(model)(ids)
        _, cache = model.forward_cached(ids, None)
        decode = torch._dynamo.explain(model)(ids[:, :1], cache, use_cache=True)
        cached_prefill = torch._dynamo.explain(model)(ids[:, :5], cache, use_cache=True)
    for name, e in (("prefill", prefill), ("decode", decode), ("cached prefill", cached_prefill)):
        assert e.graph_break_count == 0 and e.graph_count == 1, (name, e.break_reasons)
        # the KDA ops sit in the graph as opaque custom ops (what lets the dispatch choose kernels at run time)
        ops = {str(n.target) for g in e.graphs for n in g.graph.nodes if n.op == "call_function"}
        wanted = "kda_compile.recurrent_kda_fwd" if name == "decode" else "kda_compile.chunk_kda_fwd"
        assert any(wanted in op for op in ops), (name, sorted(ops))


def check_compiled_equals_eager(device, dtype, tol):
    model, ids = setup(device, dtype)
    torch._dynamo.reset()
    step = compiled_step(model)                       # torch.compile(model, fullgraph=True) underneath
    with torch.no_grad():
        logits, cache = model.forward_cached(ids[:, :30], None)
        clogits, ccache = step(ids[:, :30], None)
        assert rel_err(clogits, logits) < tol
        for t in range(30, 34):                       # several steps: the latent length changes every step
            logits, cache = model.forward_cached(ids[:, t:t + 1], cache)
            clogits, ccache = step(ids[:, t:t + 1], ccache)
            assert rel_err(clogits, logits) < tol, t
        assert isinstance(ccache, HybridCache)
        for name, a, b in zip(HybridCache.tensor_names(model.config), ccache.flatten(), cache.flatten()):
            assert a.shape == b.shape and rel_err(a, b) < tol, name


def test_compiled_equals_eager_cpu():
    check_compiled_equals_eager("cpu", torch.float32, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_compiled_equals_eager_cuda(dtype, tol):
    check_compiled_equals_eager("cuda", dtype, tol)


def test_loaded_kimi_checkpoint_compiles_whole(tmp_path):
    """A Kimi Linear checkpoint (MoE, MLA with the shared key part) loaded by from_pretrained: prefill and
    decode trace with 0 graph breaks, and the fullgraph-compiled model equals eager."""
    torch.manual_seed(0)
    HybridModel(HybridConfig.tiny_kimi()).save_pretrained(str(tmp_path))
    model = HybridModel.from_pretrained(str(tmp_path))
    ids = torch.randint(0, model.config.vocab_size, (2, 21))
    torch._dynamo.reset()
    with torch.no_grad():
        prefill = torch._dynamo.explain(model)(ids, None, use_cache=True)
        logits, cache = model.forward_cached(ids, None)
        decode = torch._dynamo.explain(model)(ids[:, :1], cache, use_cache=True)
        for name, e in (("prefill", prefill), ("decode", decode)):
            assert e.graph_break_count == 0 and e.graph_count == 1, (name, e.break_reasons)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        clogits, ccache = compiled(ids, None, use_cache=True)
        assert rel_err(clogits, logits) < 1e-6
        for t in range(3):
            logits, cache = model.forward_cached(ids[:, t:t + 1], cache)
            clogits, ccache = compiled(ids[:, t:t + 1], ccache, use_cache=True)
            assert rel_err(clogits, logits) < 1e-6, t
