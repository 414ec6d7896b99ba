"""Stage 4 of the TileLang backward: the q/k and beta prologues (docs/algorithm.md, "The chunkwise backward", section 6).

One program per (token block, key head):

* dq, dk: the float32 per-value-head gradients of the intra stage summed over the key head's group of value
  heads in a fixed order (deterministic, no atomics), then the L2 norm's backward ``r (dy - y (y . dy))`` on
  the raw rows; written in q's / k's dtype;
* dbeta of the group's value heads: the solve stage's term plus the intra stage's per-K-block terms (fixed
  order), then the sigmoid's backward when beta arrives as logits.
"""

import tilelang.language as T

from .gate import Prologue, inv_norm, sigmoid
from .target import ops_for, runtime_sizes

ACC = "float32"


@T.macro
def group_l2_bwd(ops, l2norm: bool, src, xin, dst, t0, hk, G, dy, x, work, ss, yd, run):
    """``dst`` rows ``t0 ..`` of key head ``hk`` = the L2 norm's backward (or identity) of the sum of ``src`` over
    the head's ``G`` value heads (fixed order); fragments ``dy, x, work [BT, K]``, ``ss, yd [BT]``."""
    BT, K = dy.shape
    TT = xin.shape[0]
    for t, c in ops.Parallel(BT, K):
        run[0] = 0.0
        if t0 + t < TT:
            for j in T.serial(G):
                run[0] = run[0] + src[t0 + t, hk * G + j, c]
        dy[t, c] = run[0]
        x[t, c] = T.if_then_else(t0 + t < TT, T.cast(xin[t0 + t, hk, c], ACC), 0.0)
    if l2norm:
        for t, c in ops.Parallel(BT, K):
            work[t, c] = x[t, c] * x[t, c]
        ops.rowsum(work, ss)
        for t, c in ops.Parallel(BT, K):
            work[t, c] = x[t, c] * dy[t, c]
        ops.rowsum(work, yd)
        for t, c in ops.Parallel(BT, K):   # r (dy - y (y . dy)) with y = x r
            rr = inv_norm(ss[t])
            dy[t, c] = rr * (dy[t, c] - x[t, c] * (rr * rr) * yd[t])
    for t, c in ops.Parallel(BT, K):
        if t0 + t < TT:
            dst[t0 + t, hk, c] = T.cast(dy[t, c], dst.dtype)


def kda_bwd_prologue(K: int, *, dtype: str = "bfloat16", beta_dtype: str = "float32", num_k_blocks: int = 1,
                     prologue: Prologue = Prologue(), block_T: int = 32, threads: int = 128, target: str = "cuda"):
    """Kernel factory for the prologue stage.  Task config: ``num_k_blocks`` (K blocks of the intra stage's
    beta terms).  Kernel config: ``block_T`` (tokens per program), ``threads``."""
    ops = ops_for(target)
    io = ops.tensor_dtype(dtype)   # q, k, dq, dk (float32 on the CPU)
    p = prologue
    BT = block_T
    NKB = num_k_blocks
    H, HV, TT = runtime_sizes("H HV TT")

    @T.prim_func
    def kda_bwd_prologue(q: T.Tensor((TT, H, K), io), k: T.Tensor((TT, H, K), io),
                         beta: T.Tensor((TT, HV), beta_dtype), dq_h: T.Tensor((TT, HV, K), ACC),
                         dk_h: T.Tensor((TT, HV, K), ACC), dbeta_solve: T.Tensor((TT, HV), ACC),
                         dbeta_part: T.Tensor((NKB, TT, HV), ACC), dq: T.Tensor((TT, H, K), io),
                         dk: T.Tensor((TT, H, K), io), dbeta: T.Tensor((TT, HV), beta_dtype)):
        with T.Kernel(T.ceildiv(TT, BT), H, threads=threads) as (it, hk):
            dy = ops.alloc_fragment((BT, K), ACC)
            x = ops.alloc_fragment((BT, K), ACC)
            work = ops.alloc_fragment((BT, K), ACC)
            ss = ops.alloc_fragment((BT,), ACC)
            yd = ops.alloc_fragment((BT,), ACC)
            run = T.alloc_local((1,), ACC)
            G = HV // H
            t0 = it * BT

            group_l2_bwd(ops, p.l2norm, dq_h, q, dq, t0, hk, G, dy, x, work, ss, yd, run)
            group_l2_bwd(ops, p.l2norm, dk_h, k, dk, t0, hk, G, dy, x, work, ss, yd, run)
            for t in ops.Parallel(BT):
                if t0 + t < TT:
                    for j in T.serial(G):
                        run[0] = dbeta_solve[t0 + t, hk * G + j]
                        for b in T.serial(NKB):
                            run[0] = run[0] + dbeta_part[b, t0 + t, hk * G + j]
                        if p.beta_sigmoid:
                            s = sigmoid(T.cast(beta[t0 + t, hk * G + j], ACC))
                            run[0] = run[0] * (p.beta_scale * s * (1.0 - s))
                        dbeta[t0 + t, hk * G + j] = T.cast(run[0], beta_dtype)

    return kda_bwd_prologue
