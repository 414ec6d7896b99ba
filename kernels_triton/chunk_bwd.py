"""Host side of the Triton chunkwise backward (docs/algorithm.md, "The chunkwise backward"): the stages in order.

Same conventions as the forward (chunk_fwd.py): a flat token axis ``[TT = B*T, heads, dim]``, one chunk table
for ragged T and cu_seqlens.  A training forward keeps X = (I + A_kk)^-1 and A_qk (``kept``); the rest of what the
backward reads is recomputed:

    chunk_bwd_recompute.py  0. the forward's intermediates (Gamma, X, A_qk unless kept, W, qg, kg, Gamma_C, h, V_new)
    chunk_bwd_state.py      1. reverse state recurrence: dh leaving each chunk, dV_new, dh0
    chunk_bwd_solve.py      2. through W, U and the inverse: dv, the gradients of A_kk and A_qk, beta's T term
    chunk_bwd_intra.py      3. dq, dk (per value head), dg with the reverse cumsum and the gate's backward
    chunk_bwd_prologue.py   4. group sums of dq/dk, the L2 norm's and beta sigmoid's backward

Every reduction runs in a fixed order (no atomics): two calls give bitwise-equal gradients.
Memory besides the gradients: the forward's intermediates, dh (chunks x HV x K x V, k's dtype), and float32
token-sized buffers (dV_new, dv, dq and dk per value head, the two [TT, HV, C] gradients of A).
"""
from __future__ import annotations

import torch

from kda_compile.chunks import chunk_table

from . import chunk_bwd_intra as intra_stage
from . import chunk_bwd_prologue as prologue_stage
from . import chunk_bwd_solve as solve_stage
from . import chunk_bwd_state as state_stage
from . import chunk_intra, chunk_state
from .chunk_bwd_intra import chunk_bwd_intra
from .chunk_bwd_prologue import chunk_bwd_prologue
from .chunk_bwd_recompute import recompute_forward
from .chunk_bwd_solve import chunk_bwd_solve
from .chunk_bwd_state import chunk_bwd_state
from .config import backward_config, float32_accurate_products


def get_configs() -> list[dict]:
    """The backward's search space: the default (``{}``), then its own stages' spaces (``bwd_*`` knobs, in the
    order the stages run), then those of the forward's intra and state stages, which the recompute runs (the
    forward's output stage does not run here, so its knobs are left out).  The autotuner searches one stage
    at a time (:func:`kda_compile.autotune_search.stages`)."""
    out = [{}]
    for stage in (state_stage, solve_stage, intra_stage, prologue_stage, chunk_intra, chunk_state):
        out += [config for config in stage.get_configs() if config not in out]
    return out


def check_cotangents(q, v, initial_state, do, dht, opts, num_seqs: int) -> None:
    """``ValueError`` unless ``do`` has v's shape and ``dht`` (if given) the final state's shape."""
    if tuple(do.shape) != tuple(v.shape):
        raise ValueError(f"do must have v's shape {tuple(v.shape)}, got {tuple(do.shape)}")
    if dht is not None:
        HV, K, V = v.shape[2], q.shape[3], v.shape[3]
        want = (num_seqs, HV, V, K) if opts.state_v_first else (num_seqs, HV, K, V)
        if tuple(dht.shape) != want:
            raise ValueError(f"dht must have the final state's shape {want}, got {tuple(dht.shape)}")
    if initial_state is not None and initial_state.shape[0] != num_seqs:
        raise ValueError(f"initial_state must hold {num_seqs} states, got {initial_state.shape[0]}")


def check_products(cfg, device: torch.device) -> None:
    """On a GPU, refuse a config whose products ask for float32 accuracy ("tf32x3" or "ieee"), before any kernel
    runs: Triton 3.6 compiles the solve stage with them for sm_90 into shared-memory reads out of bounds, which end
    the CUDA context (backend.supports_backward keeps float32 calls under "highest" away; this catches a config
    that names them)."""
    asked = float32_accurate_products(cfg.forward)
    if device.type == "cuda" and asked:
        raise ValueError(f"the Triton backward on a GPU takes precision and solve_precision 'tf32' only, got "
                         f"{asked}: its solve kernel faults with float32-accurate products (seen with Triton "
                         f"3.6 on sm_90); for float32-accurate gradients use another backend")


def chunk_kda_bwd(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts, do, dht, config=None,
                  kept=None):
    """Chunkwise KDA backward with Triton kernels on user-layout tensors (as chunk_fwd.chunk_kda_fwd takes them).
    ``kept``: the :class:`chunk_intra.Kept` X and aqk of the training forward on these inputs (the recompute then
    skips A_kk, aqk and the inverse), or None.

    ``do [B, T, HV, V]`` is the gradient of the output, ``dht`` that of the final state (the user's state layout)
    or None.  Returns ``(dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias)`` in the inputs' dtypes, None for an input
    that is None (``dA_log``/``ddt_bias`` also without ``use_gate_in_kernel``).
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    cfg = backward_config(config, q.dtype)
    check_products(cfg, q.device)
    table = chunk_table(B, T, cu_seqlens, opts.chunk_size, q.device)
    check_cotangents(q, v, initial_state, do, dht, opts, table.num_seqs)
    q_f, k_f, v_f = (x.reshape(B * T, x.shape[2], x.shape[3]).contiguous() for x in (q, k, v))
    g_f = g.reshape(B * T, HV, K).contiguous()
    beta_f = beta.reshape(B * T, HV).contiguous()
    do_f = do.reshape(B * T, HV, V).contiguous()
    A_log_c, dt_bias_c = (x.contiguous() if x is not None else None for x in (A_log, dt_bias))

    fwd = recompute_forward(q_f, k_f, v_f, g_f, beta_f, initial_state, A_log_c, dt_bias_c, opts, table,
                            cfg.forward, kept)
    dhn, dvn, dh0 = chunk_bwd_state(fwd, do_f, dht, initial_state is not None, opts.scale, table,
                                    opts.state_v_first, cfg)
    dv, dv_out, d_akk, d_aqk, dbeta_solve = chunk_bwd_solve(q_f, k_f, v_f, beta_f, do_f, fwd, dvn, opts, table, cfg)
    dq_h, dk_h, dg, dbeta_part, dA_part, ddt_part = chunk_bwd_intra(q_f, k_f, g_f, beta_f, A_log_c, dt_bias_c, do_f,
                                                                    fwd, dv, dhn, d_aqk, d_akk, opts, table, cfg)
    dq, dk, dbeta = chunk_bwd_prologue(q_f, k_f, beta_f, dq_h, dk_h, dbeta_solve, dbeta_part, opts, cfg)

    dA_log = ddt_bias = None
    if opts.use_gate_in_kernel:  # per-chunk partials reduced in a fixed order
        if A_log is not None:
            dA_log = dA_part.sum((0, 2)).to(A_log.dtype)
        if dt_bias is not None:
            ddt_bias = ddt_part.sum(0).reshape(HV * K).to(dt_bias.dtype)
    if dh0 is not None:
        dh0 = dh0.to(initial_state.dtype)
    return (dq.view(B, T, H, K), dk.view(B, T, H, K), dv_out.view(B, T, HV, V), dg.view(B, T, HV, K),
            dbeta.view(B, T, HV), dh0, dA_log, ddt_bias)
