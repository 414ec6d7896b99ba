"""The dispatch's decision cache (kda_compile/decision_cache.py): a repeated call reuses its decision, a change
of the registry or of what picks the bucket makes a new one."""
import torch

from kda_compile import dispatch, explain
from kda_compile.api import _check
from kda_compile.decision_cache import decision_key

from kda_inputs import make_inputs


def _count_choices(monkeypatch, chooser="_choose"):
    """The ops of the decisions ``dispatch.<chooser>`` really makes from now on (cache misses)."""
    calls = []
    real = getattr(dispatch, chooser)

    def counting(call, backend=None):
        calls.append(call.op)
        return real(call, backend)

    monkeypatch.setattr(dispatch, chooser, counting)
    dispatch._DECISIONS.clear()
    return calls


def test_a_repeated_call_reuses_its_decision(monkeypatch):
    calls = _count_choices(monkeypatch)
    a = make_inputs(B=1, T=9, H=1, K=16, V=16, dtype=torch.float32)
    first = explain(**a)
    second = explain(**a)
    assert len(calls) == 1 and second.backend.name == first.backend.name


def test_registering_a_backend_drops_the_decisions(monkeypatch):
    calls = _count_choices(monkeypatch)
    a = make_inputs(B=1, T=9, H=1, K=16, V=16, dtype=torch.float32)
    explain(**a)
    fake = dispatch.Backend(name="fake_cache", supports=lambda call: "never", run=lambda call, config: None)
    dispatch.register_backend(fake)
    try:
        explain(**a)
        assert len(calls) == 2
    finally:
        dispatch.unregister_backend("fake_cache")


def _varlen_call(offsets):
    a = make_inputs(H=1, K=16, V=16, dtype=torch.float32, cu_seqlens=offsets)
    problem, opts = _check(a["q"], a["k"], a["v"], a["g"], a["beta"], cu_seqlens=a["cu_seqlens"],
                           initial_state=a["initial_state"])
    return dispatch.KDACall("chunk", problem, opts, a["q"], a["k"], a["v"], a["g"], a["beta"], a["initial_state"],
                            a["cu_seqlens"])


def test_varlen_packs_with_the_same_total_but_other_longest_sequence_get_their_own_decision():
    """The longest sequence picks a varlen pack's bucket (offsets on the CPU), so it is part of the key."""
    short = _varlen_call([0, 1000, 2000, 3000])      # longest 1000
    long_ = _varlen_call([0, 10, 20, 3000])          # longest 2980, same packed T
    assert short.problem == long_.problem
    assert decision_key(short, None) != decision_key(long_, None)


def test_the_backward_decision_is_cached_apart_from_the_forward(monkeypatch):
    """One chunk call, two decisions: the forward's and its backward's (``chunk_bwd``) never answer for each other,
    and a repeated backward reuses its own."""
    calls = _count_choices(monkeypatch, "_choose_backward")
    call = _varlen_call([0, 10, 30])
    forward = dispatch.choose(call)
    backward = dispatch.choose_backward(call)
    assert forward.op == "chunk" and backward.op == "chunk backward" and calls == ["chunk"]
    assert dispatch.choose_backward(call) is backward and dispatch.choose(call) is forward and len(calls) == 1
    assert decision_key(call, None, "chunk_bwd") != decision_key(call, None)


def test_the_key_follows_the_environment_as_it_changes(monkeypatch):
    """The environment part of the key is read live on every call (on POSIX from os.environ's own mapping, which
    os.environ assignments update), so setting KDA_COMPILE_BACKEND or the cache folder mid-process takes effect."""
    from kda_compile.decision_cache import environment
    monkeypatch.delenv("KDA_COMPILE_BACKEND", raising=False)
    before = environment()
    monkeypatch.setenv("KDA_COMPILE_BACKEND", "reference")
    during = environment()
    monkeypatch.setenv("KDA_COMPILE_CACHE_DIR", "/tmp/elsewhere")
    after = environment()
    assert before != during != after
    assert during[0] in ("reference", b"reference") and after[1] in ("/tmp/elsewhere", b"/tmp/elsewhere")
    monkeypatch.delenv("KDA_COMPILE_BACKEND")
    assert environment()[0] is None


def test_float32_decisions_follow_the_matmul_precision():
    """A backend may refuse float32-accurate products (the Triton backward on a GPU does), so PyTorch's float32
    matmul precision is part of a float32 call's key, and of no other dtype's."""
    call = _varlen_call([0, 10, 30])
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        highest = decision_key(call, None)
        torch.set_float32_matmul_precision("high")
        assert decision_key(call, None) != highest
    finally:
        torch.set_float32_matmul_precision(before)
    a = make_inputs(B=1, T=9, H=1, K=16, V=16, dtype=torch.bfloat16)
    problem, opts = _check(a["q"], a["k"], a["v"], a["g"], a["beta"])
    bf16 = dispatch.KDACall("chunk", problem, opts, a["q"], a["k"], a["v"], a["g"], a["beta"])
    assert decision_key(bf16, None)[-1] is None


def test_the_newer_precision_api_leaves_float32_calls_working():
    """Once ``torch.backends.cuda.matmul.fp32_precision`` is set, ``torch.get_float32_matmul_precision()`` raises;
    float32 calls read the precision another way and still run, and the key still follows it."""
    from kda_compile import chunk_kda
    call = _varlen_call([0, 10, 30])
    a = make_inputs(B=1, T=9, H=1, K=16, V=16, dtype=torch.float32)
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        tf32 = decision_key(call, None)
        o, _ = chunk_kda(**a)
        assert torch.isfinite(o).all()
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert decision_key(call, None) != tf32
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
