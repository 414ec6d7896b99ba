"""Chunk tiles the backward stages rebuild from the raw inputs instead of reading them from HBM.

Macros shared by :mod:`.chunk_bwd_solve` and :mod:`.chunk_bwd_intra` (one program per chunk and value head):

* :func:`chunk_gamma`: Gamma, the chunk-local cumulative log decay of the columns ``k0 .. k0 + BK`` (the gate
  prologue applied, -inf floored at ``G_FLOOR``, rows past the chunk's end decay by 0), as the forward;
* :func:`row_norms`: the q/k L2-norm factors of the chunk's rows (1 without the norm);
* :func:`chunk_beta`: beta as the delta rule uses it (0 past the chunk's end).

Recomputing these costs a read of g (and of the full q/k rows for the norms) but saves writing Gamma and the
norm factors in the forward.
"""

import tilelang.language as T

from .gate import G_FLOOR, Prologue, beta_value, inv_norm, log_decay

ACC = "float32"
BLOCK = 16  # rows per block of the causal first-row factoring (docs/algorithm.md, "The chunkwise backward", section 7)


@T.macro
def chunk_gamma(ops, unroll, p: Prologue, g, A_log, dt_bias, bos, L, hv, k0, Gs, run):
    """``Gs [C, BK]`` = Gamma of columns ``k0 ..`` (float32); ``run`` a local float32 scratch of size >= 1."""
    for r, c in ops.Parallel(Gs.shape[0], Gs.shape[1]):
        Gs[r, c] = T.if_then_else(r < L, log_decay(p, T.cast(g[bos + r, hv, k0 + c], ACC), A_log[hv],
                                                   dt_bias[hv, k0 + c]), 0.0)
        Gs[r, c] = T.if_then_else(Gs[r, c] < G_FLOOR, G_FLOOR, Gs[r, c])
    for c in ops.Parallel(Gs.shape[1]):
        run[0] = 0.0
        for r in unroll(Gs.shape[0]):
            run[0] = run[0] + Gs[r, c]
            Gs[r, c] = run[0]


@T.macro
def row_norms(ops, l2norm: bool, x, bos, L, h, out, run):
    """``out[r]`` = L2-norm factor of row ``bos + r`` of ``x [TT, H, K]`` (head ``h``), or 1 without the norm."""
    if l2norm:
        for r in ops.Parallel(out.shape[0]):
            run[0] = 0.0
            if r < L:
                for c in T.serial(x.shape[2]):
                    run[0] = run[0] + T.cast(x[bos + r, h, c], ACC) * T.cast(x[bos + r, h, c], ACC)
            out[r] = inv_norm(run[0])
    else:
        for r in ops.Parallel(out.shape[0]):
            out[r] = 1.0


@T.macro
def chunk_beta(ops, p: Prologue, beta, bos, L, hv, bs):
    """``bs[r]`` = activated beta of the chunk's row r (0 past its end)."""
    for r in ops.Parallel(bs.shape[0]):
        bs[r] = T.if_then_else(r < L, beta_value(p, T.cast(beta[bos + r, hv], ACC)), 0.0)
