"""Gates at the edge of the domain, through the public API, for every backend that runs on this machine.

* ``exp(g) = 0`` (``g = -inf``, or a finite g so negative that exp underflows) is a valid "forget everything"
  gate: the chunk form must give the token recurrence's result, finite, output and final state.
* A NaN or ``+inf`` in ``g`` at token t may do anything from t on, but outputs before t (and every other
  sequence of a varlen pack) must be bit for bit those of the same call with finite gates from t on.
"""
import pytest
import torch

from kda_compile import chunk_kda, fused_recurrent_kda
from kda_compile.reference import KDAOptions, kda_reference

from kda_inputs import make_inputs, one_cpu_thread, rel_err  # noqa: F401  (one_cpu_thread: fixture)
from kernel_cases import backend_skip_reason

# (backend, device) pairs.  Kernel backends join where they run (Triton under TRITON_INTERPRET=1, TileLang on
# its C target, both on the GPU); the reference on the GPU checks that cuBLAS' products leak nothing either.
BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu"),
            pytest.param("reference", "cuda", id="reference-cuda", marks=pytest.mark.gpu)]
_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = [pytest.param(name, _DEVICE, id=f"{name}-{_DEVICE}",
                        marks=pytest.mark.skipif(backend_skip_reason(name) is not None,
                                                 reason=backend_skip_reason(name) or ""))
           for name in ("triton", "tilelang")]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
# The kernels floor a -inf gate at -1000 (its exp is 0 too): after it the float32 cumulative decay is ~-1e3,
# whose rounding (~6e-5 absolute) enters the later exponents; on a GPU float32 products may run as TF32.
KERNEL_TOL = 3e-3 if torch.cuda.is_available() else 3e-4


def kernel_dtype_or_skip(backend, dtype):
    if backend != "reference" and dtype == torch.float64:
        pytest.skip("the kernel backends take bf16/fp16/fp32 (float64 runs on the reference)")
NAMES = ("q", "k", "v", "g", "beta")


def run(fn, args, g, backend, **kw):
    q, k, v, _, beta = (args[n] for n in NAMES)
    extra = {n: args[n] for n in ("initial_state", "cu_seqlens") if n in args}
    return fn(q, k, v, g, beta, output_final_state=True, backend=backend, **extra, **kw)


def recurrence64(args, g):
    """The definition: the float64 token loop."""
    t = {n: args[n].double() for n in NAMES if n != "g"}
    return kda_reference(t["q"], t["k"], t["v"], g.double(), t["beta"], args["initial_state"].double(),
                         args.get("cu_seqlens"), opts=KDAOptions(scale=args["q"].shape[-1] ** -0.5),
                         algorithm="recurrent")


def forget_positions(g, where, value):
    """A copy of ``g`` with ``value`` at the named places: whole tokens (every channel of every head) and
    single channels of single heads, at chunk starts and ends, the first and the last token."""
    g = g.clone()
    T = g.shape[1]
    for t in {"first": [0], "chunk_edges": [31, 32, 63, 64], "scattered": [5, 40, 41, 99]}[where]:
        if t < T:
            g[:, t, 0] = value                 # every channel of head 0
            g[:, t, -1, t % g.shape[-1]] = value  # one channel of the last head
    g[:, -1, 0, 1] = value                     # the last token
    return g


@pytest.mark.parametrize("backend,device", BACKENDS + KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("value", [float("-inf"), -1e30])
@pytest.mark.parametrize("where", ["first", "chunk_edges", "scattered"])
def test_forget_everything_gate_matches_the_recurrence(backend, device, dtype, value, where):
    kernel_dtype_or_skip(backend, dtype)
    tol = TOL[dtype] if backend == "reference" else KERNEL_TOL
    args = make_inputs(B=2, T=110, H=2, K=32, V=32, dtype=dtype, device=device)
    g = forget_positions(args["g"], where, value)
    want_o, want_s = recurrence64(args, g)
    for fn in (chunk_kda, fused_recurrent_kda):
        o, s = run(fn, args, g, backend)
        assert torch.isfinite(o).all() and torch.isfinite(s).all(), fn.__name__
        assert rel_err(o, want_o) < tol, (fn.__name__, rel_err(o, want_o))
        assert rel_err(s, want_s) < tol, (fn.__name__, rel_err(s, want_s))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_forget_everything_gate_varlen_and_gradients(backend, device):
    """Varlen packs (chunks start at each sequence), and the backward stays finite and equals autograd
    through the recurrence."""
    args = make_inputs(H=2, K=8, V=8, cu_seqlens=[0, 37, 37, 120], requires_grad=True, device=device)
    g = forget_positions(args["g"].detach(), "chunk_edges", float("-inf")).requires_grad_(True)
    o, s = run(chunk_kda, args, g, backend)
    want_o, want_s = recurrence64(args, g)
    assert rel_err(o, want_o) < 1e-10 and rel_err(s, want_s) < 1e-10
    leaves = [args[n] for n in ("q", "k", "v", "beta", "initial_state")] + [g]
    cot_o, cot_s = torch.randn_like(o), torch.randn_like(s)
    ours = torch.autograd.grad((o * cot_o).sum() + (s * cot_s).sum(), leaves)
    ref = torch.autograd.grad((want_o * cot_o).sum() + (want_s * cot_s).sum(), leaves)
    for name, a, b in zip(("q", "k", "v", "beta", "initial_state", "g"), ours, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-9, (name, rel_err(a, b))


@pytest.mark.parametrize("backend,device", BACKENDS + KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("t", [0, 1, 31, 32, 63, 64, 100])
@pytest.mark.parametrize("whole_token", [False, True])
def test_nonfinite_gate_does_not_reach_earlier_outputs(backend, device, dtype, bad, t, whole_token):
    kernel_dtype_or_skip(backend, dtype)
    if backend == "tilelang":  # the comparison changes the gates from t on, so it needs causality bit for bit
        pytest.skip("TileLang's intra kernel is not causal bit for bit yet (tests/test_chunk.py xfails it)")
    args = make_inputs(B=2, T=110, H=2, K=32, V=32, dtype=dtype, device=device)
    poisoned, finite = args["g"].clone(), args["g"].clone()
    finite[:, t:] = torch.nn.functional.logsigmoid(torch.randn_like(finite[:, t:]))  # other finite gates
    if whole_token:
        poisoned[1, t] = bad
    else:
        poisoned[1, t, 1, 3] = bad
    poisoned[:, t + 1:] = finite[:, t + 1:]
    for fn in (chunk_kda, fused_recurrent_kda):
        o_bad, _ = run(fn, args, poisoned, backend)
        o_fin, _ = run(fn, args, finite, backend)
        assert torch.equal(o_bad[:, :t], o_fin[:, :t]), fn.__name__
        assert torch.isfinite(o_bad[:, :t]).all()
        assert not torch.isfinite(o_bad[1, t:]).all(), "the non-finite gate must show from t on"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", ["g", "k", "v"])
def test_nonfinite_input_leaves_other_sequences_and_earlier_tokens_alone(backend, device, name):
    """In a varlen pack a NaN at token t of one sequence changes no output of the other sequences and none
    before t in its own (the NaN sits mid-chunk, so a dense triangular product would carry it back)."""
    args = make_inputs(H=2, K=8, V=8, cu_seqlens=[0, 50, 120, 190], dtype=torch.float32, device=device)
    t = 80                                     # sequence 1, its token 30
    clean = {n: args[n].clone() for n in args}
    args[name] = args[name].clone()
    args[name][0, t, 0, 2] = float("nan")
    for fn in (chunk_kda, fused_recurrent_kda):
        q, k, v, g, beta = (args[n] for n in NAMES)
        o_bad, s_bad = fn(q, k, v, g, beta, initial_state=args["initial_state"], cu_seqlens=args["cu_seqlens"],
                          output_final_state=True, backend=backend)
        q, k, v, g, beta = (clean[n] for n in NAMES)
        o, s = fn(q, k, v, g, beta, initial_state=clean["initial_state"], cu_seqlens=clean["cu_seqlens"],
                  output_final_state=True, backend=backend)
        assert torch.equal(o_bad[:, :t], o[:, :t]), fn.__name__
        assert torch.equal(o_bad[:, 120:], o[:, 120:]), fn.__name__
        assert torch.equal(s_bad[[0, 2]], s[[0, 2]]), fn.__name__
