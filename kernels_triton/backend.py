"""The ``triton`` backend: what the Triton kernels cover, their config space, and the run entry points.

``supports(call)`` returns None or the reason this backend cannot run the call (dispatch then falls back):
dtypes bfloat16/float16/float32; head dims powers of two (16..128 for the chunk form, 16..256 for decode); a
float32 state (contiguous when updated in place); CUDA tensors.  Chunk calls take a state pool
(``ssm_state_indices``): the states are gathered before the kernels and scattered back after them.  On the
CPU, Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernels are defined) runs the same kernels when
the backend is named explicitly (``backend="triton"``): that is for checking the kernels without a GPU, not for
speed, so the default order keeps the reference as the CPU path.  ``supports_backward(call)`` adds the backward's
own limit: on a GPU, no float32 inputs with float32-accurate products (see there).
"""
from __future__ import annotations

import torch

from kda_compile.dispatch import Backend, KDACall, register_backend
from kda_compile.kernel_config import op_config_checker

from . import chunk_fwd, fused_recurrent, prebuilt
from .chunk_intra import kda_intra_kernel
from .config import backward_config, chunk_config, decode_config, float32_accurate_products
from .gate import interpreting

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CHUNK_DIMS = (16, 32, 64, 128)
RECURRENT_DIMS = (16, 32, 64, 128, 256)


def _kernels_interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(kda_intra_kernel, InterpretedFunction)


def _common_reason(call: KDACall) -> str | None:
    p = call.problem
    if p.device.type == "cpu":
        if not interpreting():
            return "tensors are on the CPU (Triton needs a GPU; TRITON_INTERPRET=1 runs it on the CPU, for tests)"
        if not _kernels_interpreted():
            return "TRITON_INTERPRET=1 was set after the Triton kernels were compiled for a GPU"
    elif p.device.type != "cuda":
        return f"tensors are on {p.device.type}; Triton runs on CUDA/ROCm GPUs"
    if p.dtype not in DTYPES:
        return f"dtype {p.dtype} is not supported (bfloat16, float16, float32; float64 runs on the reference)"
    dims = CHUNK_DIMS if call.op == "chunk" else RECURRENT_DIMS
    if p.K not in dims or p.V not in dims:
        return f"head dims K={p.K}, V={p.V} not supported by the Triton {call.op} kernels (each in {dims})"
    if call.initial_state is not None and call.initial_state.dtype != torch.float32:
        return f"initial_state must be float32 for the Triton kernels, got {call.initial_state.dtype}"
    if call.inplace_final_state and call.initial_state is not None and not call.initial_state.is_contiguous():
        return "inplace_final_state with a non-contiguous initial_state (the kernel updates the pool in place)"
    return None


def supports_forced(call: KDACall) -> str | None:
    """Named explicitly: CPU tensors run on Triton's interpreter when it is on."""
    return _common_reason(call)


def supports(call: KDACall) -> str | None:
    """Default order: GPU tensors only (the interpreter is for checking the kernels, not for speed)."""
    if call.problem.device.type == "cpu":
        return ("CPU tensors: Triton runs on a GPU (its interpreter, TRITON_INTERPRET=1, runs when asked for "
                "with backend='triton')")
    return _common_reason(call)


def supports_backward(call: KDACall) -> str | None:
    """Why the Triton backward cannot take ``call`` beyond :func:`supports` (None: it can).  Float32 inputs while
    PyTorch asks for float32-accurate matmuls ("highest", its default) get float32-accurate products (3xTF32, and
    FMA for the inverse), and Triton 3.6 compiles the backward's solve kernel with them for sm_90 into
    shared-memory reads out of bounds: an illegal address that ends the CUDA context (compute-sanitizer on the
    H200: K = 64 or 128 in one chunk, K = 16 over two chunks).  With TF32 products the same kernels run clean, so
    such calls go to the next backend, on every GPU until a fix has run there: the rule of chunk_bwd.check_products,
    applied to the call's default precision fields (those of float32 inputs under "highest")."""
    p = call.problem
    if p.device.type == "cuda" and float32_accurate_products(chunk_config(None, p.dtype)):
        return ("float32 inputs with float32-accurate products (PyTorch's float32 matmul precision is 'highest'): "
                "the Triton backward's solve kernel faults on the GPU with them (seen with Triton 3.6 on sm_90); "
                "torch.set_float32_matmul_precision('high') runs it with TF32 products")
    return None


def default_config(call: KDACall) -> dict:
    """The shipped kernel config of the call's op: empty, every field at its default (config.py)."""
    return {}


def configs(call: KDACall) -> list[dict]:
    """Configs worth trying for the call (the autotuner's search space)."""
    if call.op == "chunk":
        return chunk_fwd.get_configs()
    return [{}] + fused_recurrent.get_configs()


check_config = op_config_checker({"chunk": chunk_config, "recurrent": decode_config, "chunk_bwd": backward_config})


def backward_configs(call: KDACall) -> list[dict]:
    """The backward's search space (chunk_bwd.get_configs: its own stages and the recompute's)."""
    from .chunk_bwd import get_configs
    return get_configs()


def _use_prebuilt(call: KDACall) -> None:
    """Before the first kernel of the process: the shipped compiled kernels into Triton's cache (prebuilt.py)."""
    if not prebuilt.DONE and call.problem.device.type == "cuda":
        prebuilt.install(call.problem.device)


def run(call: KDACall, config: dict):
    """Run ``call`` with the Triton kernels; returns ``(o, final_state or None)``."""
    _use_prebuilt(call)
    if call.op == "chunk" and call.ssm_state_indices is not None:
        return chunk_fwd.chunk_kda_fwd_pooled(call.q, call.k, call.v, call.g, call.beta, call.initial_state,
                                              call.ssm_state_indices, call.cu_seqlens, call.A_log, call.dt_bias,
                                              call.opts, call.inplace_final_state, config)
    if call.op == "chunk":
        return chunk_fwd.chunk_kda_fwd(call.q, call.k, call.v, call.g, call.beta, call.initial_state,
                                       call.cu_seqlens, call.A_log, call.dt_bias, call.opts,
                                       call.output_final_state, config)
    return fused_recurrent.fused_recurrent_kda_fwd(
        call.q, call.k, call.v, call.g, call.beta, call.initial_state, call.cu_seqlens, call.A_log, call.dt_bias,
        call.opts, output_final_state=call.output_final_state, ssm_state_indices=call.ssm_state_indices,
        num_accepted_tokens=call.num_accepted_tokens, inplace_final_state=call.inplace_final_state, config=config)


def run_states(call: KDACall, config: dict):
    """Chunk ``call`` plus the state entering each chunk: ``(o, final_state, h)``."""
    _use_prebuilt(call)
    return chunk_fwd.chunk_kda_fwd(call.q, call.k, call.v, call.g, call.beta, call.initial_state, call.cu_seqlens,
                                   call.A_log, call.dt_bias, call.opts, True, config, return_states=True)


def run_training(call: KDACall, config: dict):
    """The forward of a differentiable chunk ``call``, keeping X and aqk for :func:`run_backward`:
    ``(o, final_state or None, [x, aqk])`` (:func:`kept_shapes`)."""
    _use_prebuilt(call)
    o, final, kept = chunk_fwd.chunk_kda_fwd(call.q, call.k, call.v, call.g, call.beta, call.initial_state,
                                             call.cu_seqlens, call.A_log, call.dt_bias, call.opts,
                                             call.output_final_state, config, keep=True)
    return o, final, list(kept)


def kept_shapes(call: KDACall) -> list:
    """``(shape, dtype)`` of what :func:`run_training` keeps: X (float32) and aqk (v's dtype), both ``[B*T, HV,
    C]``, row r of a chunk at its token r."""
    p = call.problem
    shape = (p.B * p.T, p.HV, call.opts.chunk_size)
    return [(shape, torch.float32), (shape, call.v.dtype)]


def run_backward(call: KDACall, config: dict, do, dht, kept: tuple | None = None):
    """Gradients of a chunk ``call`` (kernels_triton/chunk_bwd.py): ``(dq, dk, dv, dg, dbeta, dh0, dA_log,
    ddt_bias)``, None for absent inputs.  ``kept``: :func:`run_training`'s X and aqk for this call, or None."""
    from .chunk_bwd import chunk_kda_bwd
    from .chunk_intra import Kept
    _use_prebuilt(call)
    return chunk_kda_bwd(call.q, call.k, call.v, call.g, call.beta, call.initial_state, call.cu_seqlens, call.A_log,
                         call.dt_bias, call.opts, do, dht, config, kept=Kept(*kept) if kept else None)


TRITON_BACKEND = Backend(
    name="triton", supports=supports, supports_forced=supports_forced, run=run, run_states=run_states,
    run_backward=run_backward, supports_backward=supports_backward, run_training=run_training,
    kept_shapes=kept_shapes, chunk_state_pool=True, padding_slots=True,
    default_config=default_config, configs=configs, check_config=check_config,
    backward_configs=backward_configs,
    description="Triton kernels: intra (Gamma, A, inverse, W/U), state recurrence, output; decode kernel with "
                "state pool")
register_backend(TRITON_BACKEND)
