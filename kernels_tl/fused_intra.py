"""On-chip intra-chunk steps of the fused forward (:mod:`.chunk_fused`), as TileLang macros.

Each macro works on one chunk already in shared memory (or, on the C target, in local arrays; :mod:`.target`):

* :func:`load_chunk`: q, k (L2-normalised when asked), Gamma (gate prologue, -inf floored, chunk-local cumulative
  sum; padding rows decay by 0) and beta;
* :func:`range_check`: the rows whose first-row factoring would leave ``exp(+-SPAN)`` (log gate only);
* :func:`a_products`: A_kk and A_qk, one tensor-core product per 16-row block factored around the block's
  **first** row ``f`` with shift ``d`` (docs/algorithm.md, "Causal factoring"); flagged rows take their diagonal
  tile element-wise; masks, beta and scale by selection;
* :func:`block_inverse`: ``X = (I + A_kk)^-1``: 16x16 diagonal blocks by forward substitution (one column per
  thread, 16-long chains), then ``X = (I - N)(I + N^2) Dinv`` with ``N = Dinv A_off`` (float32 operands: TF32
  tensor cores on the GPU).

Entry (r, s) of A reads only tokens up to max(r, s), so no output depends on a later token, bit for bit.
"""

import tilelang.language as T

from .gate import G_FLOOR, Prologue, beta_value, finite_or_zero, inv_norm, log_decay

ACC = "float32"
BLOCK = 16          # row block of the A products and diagonal block of the inverse
SPAN = 60.0         # |Gamma_r - Gamma_f + d| allowed for the factored product (both factors within exp(+-60))
SAFE_BOUND = 8.0    # largest |lower_bound| of the safe gate for which no row needs the range check


def factor_shift(p: Prologue):
    """``(d, check)``: the safe gate with |lower_bound| <= SAFE_BOUND centres the 15-token range of Gamma_r -
    Gamma_f in [15 lower_bound, 0] and needs no check; any other gate uses d = SPAN / 2 and checks each row."""
    if p.gate and p.lower_bound is not None and abs(p.lower_bound) <= SAFE_BOUND:
        return -7.5 * p.lower_bound, False
    return SPAN / 2, True



@T.macro
def exact_diagonal_entry(ks, qs, Gs, run, Akk, Aqk, r, s):
    """Entry (r, s), s <= r, of a diagonal 16x16 tile of A_kk and A_qk (no row factors, no scale), element-wise
    over the channels: ``sum_c x_r[c] exp(Gamma_r[c] - Gamma_s[c]) k_s[c]`` for x = k, q, every exponent <= 0.
    ``run``: two float32 registers of scratch."""
    run[0] = 0.0
    run[1] = 0.0
    for c in T.serial(ks.shape[1]):
        kd = T.cast(ks[s, c], "float32") * T.exp(Gs[r, c] - Gs[s, c])
        run[0] = run[0] + T.cast(ks[r, c], "float32") * kd
        run[1] = run[1] + T.cast(qs[r, c], "float32") * kd
    Akk[r, s] = run[0]
    Aqk[r, s] = run[1]

@T.macro
def chunk_gamma(ops, p: Prologue, unroll, g, A_log, dt_bias, bos, L, hv, Gs, run):
    """``Gs [C, K]`` = Gamma of rows ``bos .. bos + L`` of value head ``hv``: the log decay (the gate applied when
    the prologue asks; floored at G_FLOOR, so -inf keeps its meaning and NaN stays NaN; 0 for rows >= L) summed
    down the chunk, one column per thread with the running sum in the register ``run [1]``."""
    C, K = Gs.shape
    for r, c in ops.Parallel(C, K):
        Gs[r, c] = T.if_then_else(r < L, log_decay(p, T.cast(g[bos + r, hv, c], ACC), A_log[hv], dt_bias[hv, c]),
                                  0.0)
        Gs[r, c] = T.if_then_else(Gs[r, c] < G_FLOOR, G_FLOOR, Gs[r, c])
    for c in ops.Parallel(K):
        run[0] = 0.0
        for r in unroll(C):
            run[0] = run[0] + Gs[r, c]
            Gs[r, c] = run[0]


@T.macro
def load_chunk(ops, p: Prologue, unroll, dtype: str, q, k, g, beta, A_log, dt_bias, bos, L, h, hv, qs, ks, Gs, bs,
               run, sq, nrm, rq, rk):
    """Rows ``bos .. bos + L`` of key head ``h`` / value head ``hv`` into ``qs, ks`` (tile dtype, normalised when
    asked and rounded to ``dtype``), ``Gs`` (Gamma, float32), ``bs`` (beta); rows >= L are zeros (Gamma stays at
    its last value).  ``run [1]`` local, ``sq [C, K]``, ``nrm [C]``, ``rq, rk [C]``: float32 scratch."""
    C, K = qs.shape
    tile = qs.dtype
    for r, c in ops.Parallel(C, K):
        qs[r, c] = T.if_then_else(r < L, T.cast(q[bos + r, h, c], tile), T.cast(0, tile))
        ks[r, c] = T.if_then_else(r < L, T.cast(k[bos + r, h, c], tile), T.cast(0, tile))
    for r in ops.Parallel(C):
        bs[r] = T.if_then_else(r < L, beta_value(p, T.cast(beta[bos + r, hv], ACC)), 0.0)
    chunk_gamma(ops, p, unroll, g, A_log, dt_bias, bos, L, hv, Gs, run)
    if p.l2norm:
        _normalise_rows(ops, dtype, qs, sq, nrm, rq)
        _normalise_rows(ops, dtype, ks, sq, nrm, rk)


@T.macro
def _normalise_rows(ops, dtype: str, x, sq, nrm, factor):
    C, K = x.shape
    for r, c in ops.Parallel(C, K):
        sq[r, c] = T.cast(x[r, c], ACC) * T.cast(x[r, c], ACC)
    ops.rowsum(sq, nrm)
    for r in ops.Parallel(C):
        factor[r] = inv_norm(nrm[r])
    for r, c in ops.Parallel(C, K):
        x[r, c] = ops.to_tile(T.cast(x[r, c], ACC) * factor[r], dtype)


@T.macro
def range_check(ops, Gs, L, d: float, span, spans, work, exact):
    """``exact[r] = 1`` when row r or an earlier row of its 16-row block has ``|Gamma - Gamma_f + d| > SPAN``
    (f the block's first row); rows >= L count as in range.  ``span [C]`` (fragment), ``spans [C]`` (shared),
    ``work [C, K]``: float32 scratch."""
    C, K = Gs.shape
    for r, c in ops.Parallel(C, K):
        dev = Gs[r, c] - Gs[(r // BLOCK) * BLOCK, c] + d
        work[r, c] = T.if_then_else(r < L, T.max(dev, -dev), 0.0)   # |dev| (the C target has no fabs)
    if ops.cpu:
        for r in T.serial(C):
            span[r] = 0.0
            for c in T.serial(K):
                span[r] = T.max(span[r], work[r, c])
    else:
        T.reduce_max(work, span, dim=1)
    for r in ops.Parallel(C):
        spans[r] = span[r]
    for r in ops.Parallel(C):
        exact[r] = 0
        for j in T.serial(BLOCK):
            if (r // BLOCK) * BLOCK + j <= r:
                if spans[(r // BLOCK) * BLOCK + j] > SPAN:
                    exact[r] = 1


@T.macro
def a_products(ops, qs, ks, Gs, bs, exact, d: float, check: bool, scale: float, a_dtype: str,
               trk, trq, tcol, acck, accq, run, Akk, aqk):
    """``Akk`` (float32, ``beta_r A_kk``, strictly lower, non-finite entries zeroed) and ``aqk`` (tile dtype,
    ``scale A_qk``, causal).  Row block i: ``A^T[:, f:f+16] = tcol trk^T`` with ``trk[j] = k_{f+j}
    exp(Gamma_{f+j} - Gamma_f + d)`` and ``tcol[s] = k_s exp(Gamma_f - d - Gamma_s)`` (s < f + 16), one
    [C, K] x [K, 16] product (the transposed form gives the tensor cores M = C rows)."""
    C, K = ks.shape
    for i in T.serial(C // BLOCK):
        f = i * BLOCK
        for j, c in ops.Parallel(BLOCK, K):
            e_r = T.exp(Gs[f + j, c] - Gs[f, c] + d)
            trk[j, c] = ops.to_tile(T.cast(ks[f + j, c], ACC) * e_r, a_dtype)
            trq[j, c] = ops.to_tile(T.cast(qs[f + j, c], ACC) * e_r, a_dtype)
        for s, c in ops.Parallel(C, K):
            tcol[s, c] = T.if_then_else(
                s < f + BLOCK, ops.to_tile(T.cast(ks[s, c], ACC) * T.exp(Gs[f, c] - d - Gs[s, c]), a_dtype),
                T.cast(0, tcol.dtype))
        T.clear(acck)
        T.clear(accq)
        T.gemm(tcol, trk, acck, transpose_B=True)
        T.gemm(tcol, trq, accq, transpose_B=True)
        for s, j in ops.Parallel(C, BLOCK):
            Akk[f + j, s] = acck[s, j]
            aqk[f + j, s] = accq[s, j]   # float32 here; rounded to the tile dtype below
    if check:
        # rows out of range: their diagonal tile element-wise, every exponent Gamma_r - Gamma_s <= 0
        for r, s0 in ops.Parallel(C, BLOCK):
            if exact[r] != 0:
                s = (r // BLOCK) * BLOCK + s0
                if s <= r:
                    exact_diagonal_entry(ks, qs, Gs, run, Akk, aqk, r, s)
    # causal masks, beta and scale, by selection (an entry above the diagonal may be inf or NaN)
    for r, s in ops.Parallel(C, C):
        Akk[r, s] = T.if_then_else(s < r, finite_or_zero(Akk[r, s] * bs[r]), 0.0)
        aqk[r, s] = T.if_then_else(s <= r, aqk[r, s] * scale, 0.0)


@T.macro
def block_inverse(ops, unroll, Akk, xcol, Dinv, Ns, Zs, Nf, Pf, Xf):
    """``Xf = (I + Akk)^-1`` (float32 fragment) for the strictly lower ``Akk [C, C]``, which is overwritten (it holds
    A_off, then ``I - N`` and the product ``(I - N)(I + N^2)``).  ``Dinv``, ``Ns``, ``Zs``: float32 [C, C] shared
    scratch; ``Nf``, ``Pf``: float32 fragments; ``xcol [16]`` local."""
    C = Akk.shape[0]
    for r, s in ops.Parallel(C, C):
        Dinv[r, s] = 0.0
    # diagonal blocks: column j of its block's inverse by forward substitution, in registers
    for j in ops.Parallel(C):
        b = (j // BLOCK) * BLOCK
        for rr in unroll(BLOCK):
            xcol[rr] = T.if_then_else(b + rr == j, 1.0, 0.0)
            for ss in unroll(BLOCK):
                if ss < rr:
                    xcol[rr] = xcol[rr] - Akk[b + rr, b + ss] * xcol[ss]
            Dinv[b + rr, j] = xcol[rr]
    for r, s in ops.Parallel(C, C):   # Akk -> A_off (the blocks below the diagonal blocks)
        Akk[r, s] = T.if_then_else((r // BLOCK) == (s // BLOCK), 0.0, Akk[r, s])
    # (I + A) = Dblk (I + N), N = Dinv A_off strictly block-lower: (I + N)^-1 = (I - N)(I + N^2) (N^4 = 0 at C = 64)
    T.clear(Nf)
    T.gemm(Dinv, Akk, Nf)
    for r, s in ops.Parallel(C, C):
        Ns[r, s] = Nf[r, s]
    if C // BLOCK > 2:
        T.clear(Pf)
        T.gemm(Ns, Ns, Pf)
        for r, s in ops.Parallel(C, C):
            eye = T.if_then_else(r == s, 1.0, 0.0)
            Akk[r, s] = eye - Ns[r, s]
            Zs[r, s] = eye + Pf[r, s]
        T.clear(Pf)
        T.gemm(Akk, Zs, Pf)
        for r, s in ops.Parallel(C, C):
            Akk[r, s] = Pf[r, s]
    else:
        for r, s in ops.Parallel(C, C):
            Akk[r, s] = T.if_then_else(r == s, 1.0, 0.0) - Ns[r, s]
    T.clear(Xf)
    T.gemm(Akk, Dinv, Xf)
