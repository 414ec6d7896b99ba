"""The ``tilelang`` backend: the TileLang kernels behind :mod:`kda_compile.dispatch` (registered on import).

``chunk`` calls run the chunkwise forward (:mod:`.chunk_fwd`), ``recurrent`` calls the decode kernel
(:mod:`.fused_recurrent`).  On CUDA it is a default choice; on the CPU the same programs built for TileLang's C
target run only when asked for by name (``backend="tilelang"``): they exist so CI can check the kernels without
a GPU, not for speed, so in the default order the reference stays the CPU path.
"""
from __future__ import annotations

import importlib.util

import torch

from ..dispatch import Backend, KDACall, register_backend
from ..kernel_config import op_config_checker
from . import config as chunk_configs
from .config import backward_config, chunk_config, decode_config

# TileLang itself is imported on the first run or search-space query, not here: a process whose calls go to
# another backend never pays for it (cold start).  A missing TileLang still fails this import, so the dispatch
# records why the backend is unavailable.
if importlib.util.find_spec("tilelang") is None:
    raise ImportError("No module named 'tilelang'")
TL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)   # the dtypes target.TL_DTYPES compiles


def _kernels():
    """The kernel modules (imports TileLang on first use)."""
    from . import chunk_bwd, chunk_fwd, fused_recurrent
    return chunk_fwd, chunk_bwd, fused_recurrent

HEAD_DIMS = (32, 64, 128)
MIN_CAPABILITY = (8, 0)  # T.gemm lowers to mma on sm_80 too; measured and tested on sm_90 only
SMALL_DECODE = 256       # sequences x value heads at or below which decode is latency-bound


def _common_reason(call: KDACall) -> str | None:
    p = call.problem
    if p.dtype not in TL_DTYPES:
        return f"dtype {p.dtype} not compiled (bf16, fp16, fp32 only)"
    if p.K not in HEAD_DIMS or p.V not in HEAD_DIMS:
        return f"head dims K={p.K}, V={p.V} not compiled (K, V in {HEAD_DIMS})"
    if p.device.type == "cuda":
        cap = torch.cuda.get_device_capability(p.device)
        if cap < MIN_CAPABILITY:
            return f"GPU compute capability {cap} < {MIN_CAPABILITY}"
    elif p.device.type != "cpu":
        return f"device {p.device.type} has no TileLang build here"
    if call.op == "recurrent":
        if call.inplace_final_state and call.initial_state is not None and (
                call.initial_state.dtype != torch.float32 or not call.initial_state.is_contiguous()):
            return "in-place state update needs a contiguous float32 state"
    return None


def supports_forced(call: KDACall) -> str | None:
    """Named explicitly: CPU tensors run the C-target build."""
    return _common_reason(call)


def supports(call: KDACall) -> str | None:
    """Default order: GPU only (the C-target build is for CI checks, not speed)."""
    if call.problem.device.type == "cpu":
        return "CPU tensors: the TileLang C build is for CI checks; ask for it with backend='tilelang'"
    return _common_reason(call)


def run(call: KDACall, config: dict):
    """Run ``call`` with the TileLang kernels; returns ``(o, final_state or None)``."""
    chunk_fwd, _, fused_recurrent = _kernels()
    if call.op == "chunk":
        return chunk_fwd.chunk_kda_fwd(call.q, call.k, call.v, call.g, call.beta, call.initial_state, call.cu_seqlens,
                             call.A_log, call.dt_bias, call.opts, call.output_final_state, config)
    return fused_recurrent.fused_recurrent_kda_fwd(
        call.q, call.k, call.v, call.g, call.beta, call.initial_state, call.cu_seqlens, call.A_log, call.dt_bias,
        call.opts, output_final_state=call.output_final_state, ssm_state_indices=call.ssm_state_indices,
        num_accepted_tokens=call.num_accepted_tokens, inplace_final_state=call.inplace_final_state, config=config)


def run_backward(call: KDACall, config: dict, do, dht):
    """Gradients of a ``chunk`` call with the TileLang backward (:mod:`.chunk_bwd`): ``do`` is the gradient of
    the output, ``dht`` that of the final state or None; ``config`` a :class:`config.BackwardConfig` as a dict.
    Returns ``(dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias)``, None for inputs that are None."""
    if call.op != "chunk":
        raise ValueError(f"the TileLang backward covers chunk calls only, got op={call.op!r}")
    return _kernels()[1].chunk_kda_bwd(call.q, call.k, call.v, call.g, call.beta, call.initial_state, call.cu_seqlens,
                         call.A_log, call.dt_bias, call.opts, do, dht, config)


def default_config(call: KDACall) -> dict:
    """Measured on the H100: decode of few heads x sequences is latency-bound and prefers many small programs
    (tile layout, 16 columns); large batches prefer one thread per column (the dataclass default)."""
    if call.op == "recurrent" and call.problem.N * call.problem.HV <= SMALL_DECODE:
        return {"layout": "tile", "decode_BV": 16, "decode_threads": 64}
    return {}


def configs(call: KDACall) -> list[dict]:
    """Search space for the autotuner: the fused forward's ``config.get_configs()``, or the decode space."""
    if call.op == "recurrent":
        return _kernels()[2].get_configs()
    return chunk_configs.get_configs()


def run_states(call: KDACall, config: dict):
    """Chunk ``call`` plus the state entering each chunk (unsplit): ``(o, final_state, h)``."""
    return _kernels()[0].chunk_kda_fwd(call.q, call.k, call.v, call.g, call.beta, call.initial_state,
                                       call.cu_seqlens, call.A_log,
                         call.dt_bias, call.opts, True, config, return_states=True)


check_config = op_config_checker({"chunk": chunk_config, "recurrent": decode_config, "chunk_bwd": backward_config})


def backward_configs(call: KDACall) -> list[dict]:
    """Search space of the backward for the autotuner (``config.get_backward_configs()``)."""
    return chunk_configs.get_backward_configs()


TILELANG = Backend(name="tilelang", supports=supports, supports_forced=supports_forced, run=run, run_states=run_states,
                   run_backward=run_backward,
                   default_config=default_config, configs=configs, check_config=check_config,
                   backward_configs=backward_configs, padding_slots=True,
                   description="TileLang kernels: one fused chunkwise forward (segment scan for long sequences); "
                               "decode kernel")
register_backend(TILELANG)
