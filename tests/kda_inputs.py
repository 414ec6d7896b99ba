"""Random KDA inputs and error metrics shared by the tests (fresh random data on every call)."""
from __future__ import annotations

import pytest
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are empty)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    if ref.numel() == 0:
        return 0.0
    return (out - ref).norm().item() / max(denom, 1e-300)


def make_inputs(B=2, T=70, H=2, HV=None, K=16, V=16, dtype=torch.float64, device="cpu", *, gate="log",
                beta_logits=False, initial_state=True, cu_seqlens=None, state_v_first=False, seed=None,
                requires_grad=False):
    """A dict of keyword arguments for chunk_kda/fused_recurrent_kda (plus 'q'... as keys).

    gate: "log" (g = log-space decay < 0), "raw" (raw gate + A_log, dt_bias for use_gate_in_kernel).
    With ``cu_seqlens`` (a list), B is forced to 1 and T to the last offset.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    HV = HV or H
    if cu_seqlens is not None:
        B, T = 1, cu_seqlens[-1]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale)

    args = dict(
        q=rand(B, T, H, K), k=rand(B, T, H, K) / K ** 0.5, v=rand(B, T, HV, V),
        beta=rand(B, T, HV) if beta_logits else torch.rand(B, T, HV, generator=gen, dtype=torch.float64),
    )
    if gate == "log":
        args["g"] = torch.nn.functional.logsigmoid(rand(B, T, HV, K) + 2.0)  # mostly mild decay, some strong
    else:
        args["g"] = rand(B, T, HV, K)
        args["A_log"] = rand(HV, scale=0.5)
        args["dt_bias"] = rand(HV * K, scale=0.5)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state:
        shape = (N, HV, V, K) if state_v_first else (N, HV, K, V)
        args["initial_state"] = rand(*shape, scale=0.5)
    if cu_seqlens is not None:
        args["cu_seqlens"] = torch.tensor(cu_seqlens, dtype=torch.long)
    out = {}
    for name, x in args.items():
        if name == "cu_seqlens":
            out[name] = x.to(device)
            continue
        target = dtype if name in ("q", "k", "v") else (torch.float32 if dtype != torch.float64 else torch.float64)
        if name in ("g", "beta"):
            target = dtype
        x = x.to(device=device, dtype=target)
        if requires_grad:
            x.requires_grad_(True)
        out[name] = x
    return out


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """One torch CPU thread for a test module (import it there): the tiny models gain nothing from threads,
    and on the small shared CI box extra threads only add stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
