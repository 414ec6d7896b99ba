"""``python -m kda_compile demo``: KDA through the public API on a realistic small problem, checked against
the float64 token recurrence, with the backend chosen, the error and the time."""
from __future__ import annotations

import time

import torch

from .api import chunk_kda, explain, fused_recurrent_kda
from .reference import KDAOptions, kda_reference


def _timed(fn, repeats: int = 3):
    """(result, best wall time in ms) over a few runs; synchronises CUDA around each."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) * 1e3)
    return result, best


def run_kda_step(B: int = 2, T: int = 1000, H: int = 4, D: int = 64, device: str = "cpu", dtype=torch.float32,
                 seed: int = 0) -> dict:
    """Prefill (chunk_kda) then one decode step (fused_recurrent_kda) with the model's fused prologues;
    prints and returns the backend, relative errors vs the float64 recurrence and times."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    HV = H
    q, k, v = rand(B, T + 1, H, D), rand(B, T + 1, H, D), rand(B, T + 1, HV, D)
    g, beta = rand(B, T + 1, HV, D), rand(B, T + 1, HV)
    A_log, dt_bias = rand(HV) * 0.5, rand(HV * D) * 0.5
    flags = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                 A_log=A_log.to(device), dt_bias=dt_bias.to(device))
    to = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    prefill = [to(x[:, :T]) for x in (q, k, v, g, beta)]
    step = [to(x[:, T:]) for x in (q, k, v, g, beta)]

    print(f"KDA demo: B={B} T={T} H={H} K=V={D} {str(dtype).replace('torch.', '')} on {device}, "
          f"fused prologues (L2 norm, gate, beta sigmoid)")
    print("  " + str(explain(*prefill, **flags)).replace("\n", "\n  "))
    (o, state), prefill_ms = _timed(lambda: chunk_kda(*prefill, output_final_state=True, **flags))
    (o1, state1), decode_ms = _timed(lambda: fused_recurrent_kda(*step, initial_state=state,
                                                                 output_final_state=True, **flags))

    # The definition: token-by-token recurrence in float64 over all T + 1 tokens.
    opts = KDAOptions(scale=D ** -0.5, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                      use_beta_sigmoid_in_kernel=True)
    start = time.perf_counter()
    ref_o, ref_state = kda_reference(*(x.double() for x in (q, k, v, g, beta)), A_log=A_log.double(),
                                     dt_bias=dt_bias.double(), opts=opts, algorithm="recurrent")
    ref_ms = (time.perf_counter() - start) * 1e3

    def rel(a, b):
        return ((a.double().cpu() - b).norm() / b.norm()).item()

    result = dict(prefill_err=rel(o, ref_o[:, :T]), decode_err=rel(o1, ref_o[:, T:]),
                  state_err=rel(state1, ref_state), prefill_ms=prefill_ms, decode_ms=decode_ms, ref_ms=ref_ms,
                  backend=explain(*prefill, **flags).backend.name)
    print(f"  prefill  chunk_kda:           {prefill_ms:8.2f} ms   rel. error vs float64 recurrence "
          f"{result['prefill_err']:.2e}")
    print(f"  decode   fused_recurrent_kda: {decode_ms:8.2f} ms   rel. error {result['decode_err']:.2e} "
          f"(final state {result['state_err']:.2e})")
    print(f"  float64 token recurrence:     {ref_ms:8.2f} ms")
    ok = max(result["prefill_err"], result["decode_err"], result["state_err"]) < (1e-4 if dtype == torch.float32
                                                                                   else 2e-2)
    print(f"  {'OK' if ok else 'MISMATCH'}: KDA matches its definition")
    result["ok"] = ok
    return result
