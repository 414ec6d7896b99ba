"""PyTorch reference for Kimi Delta Attention (the math is in docs/algorithm.md).

Two implementations of the same function, both exact in float64:

* :func:`kda_recurrent` -- the token-by-token recurrence (the definition every kernel must equal).
* :func:`kda_chunkwise` -- the chunkwise form, vectorised over batch and heads; only the chunks are looped.

Both take *prepared* inputs (see :func:`prepare`): the prologues (q/k L2 norm, gate, beta sigmoid) applied,
key heads repeated up to the value heads, varlen packs padded into a ``[N, T, HV, ...]`` batch.  Padding
tokens carry ``g = 0, beta = 0, k = 0`` so they leave the state untouched; their outputs are dropped.

:func:`kda_reference` runs the whole pipeline on user-layout tensors; it is the ``reference`` backend and the
CPU fallback.  Everything is differentiable with ordinary autograd.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

L2NORM_EPS = 1e-6  # same epsilon as flash-linear-attention's fused L2 norm


@dataclass(frozen=True)
class KDAOptions:
    """The non-tensor arguments of a KDA call (names as in flash-linear-attention).

    They cross the ``torch.library`` custom-op boundary as positional scalars in the order of these fields;
    :meth:`op_schema`, :meth:`as_op_args` and :meth:`from_op_args` derive that order from the fields, so
    adding or moving a field here changes every op consistently.
    """

    scale: float
    use_qk_l2norm_in_kernel: bool = False
    use_gate_in_kernel: bool = False
    use_beta_sigmoid_in_kernel: bool = False
    allow_neg_eigval: bool = False
    lower_bound: float | None = None
    chunk_size: int = 64
    state_v_first: bool = False

    @classmethod
    def op_schema(cls) -> str:
        """The options' part of a custom-op schema, e.g. ``"float scale, bool use_qk_l2norm_in_kernel, ..."``."""
        return ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in fields(cls))

    @classmethod
    def op_arg_count(cls) -> int:
        """How many positional op arguments the options take."""
        return len(_OP_FIELDS)

    def as_op_args(self) -> tuple:
        """The options as the op's positional arguments, in :meth:`op_schema` order."""
        return tuple(getattr(self, name) for name in _OP_FIELDS)

    @classmethod
    def from_op_args(cls, args) -> "KDAOptions":
        """Inverse of :meth:`as_op_args`: exactly :meth:`op_arg_count` values, in :meth:`op_schema` order."""
        args = tuple(args)
        if len(args) != len(_OP_FIELDS):
            raise TypeError(f"KDAOptions.from_op_args takes {len(_OP_FIELDS)} values {_OP_FIELDS}, got {len(args)}")
        return cls(*args)


# Field annotation (a string under ``from __future__ import annotations``) -> custom-op schema type.
_SCHEMA_TYPES = {"float": "float", "bool": "bool", "int": "int", "float | None": "float?"}
_OP_FIELDS = tuple(f.name for f in fields(KDAOptions))


# ----------------------------------------------------------------------------------------------- prologues

def l2_normalize(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """``x / sqrt(sum(x**2) + eps)`` over the last dimension."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def kda_gate(g: torch.Tensor, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None,
             lower_bound: float | None) -> torch.Tensor:
    """Log-space decay from the raw gate ``g: [..., HV, K]``.

    ``-exp(A_log) * softplus(g + dt_bias)``, or with ``lower_bound`` set,
    ``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))`` (``A_log`` may then be None).
    """
    HV, K = g.shape[-2:]
    x = g if dt_bias is None else g + dt_bias.to(g.dtype).view(HV, K)
    if lower_bound is not None:
        if A_log is not None:
            x = A_log.to(g.dtype).view(HV, 1).exp() * x
        return lower_bound * torch.sigmoid(x)
    return -A_log.to(g.dtype).view(HV, 1).exp() * F.softplus(x)


def beta_activation(beta: torch.Tensor, opts: KDAOptions) -> torch.Tensor:
    """Beta as used by the delta rule: ``sigmoid`` (times 2 with ``allow_neg_eigval``) when given as logits."""
    if not opts.use_beta_sigmoid_in_kernel:
        return beta
    return torch.sigmoid(beta) * (2.0 if opts.allow_neg_eigval else 1.0)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs compute (and keep their state) in float64; everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------ varlen <-> padded

def sequence_bounds(T: int, B: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int]]:
    """``(start, length)`` of every sequence in the flattened token axis."""
    if cu_seqlens is None:
        return [(b * T, T) for b in range(B)]
    offsets = cu_seqlens.tolist()
    return [(s, e - s) for s, e in zip(offsets[:-1], offsets[1:])]


def to_padded(x: torch.Tensor, bounds: list[tuple[int, int]], length: int) -> torch.Tensor:
    """``x: [B, T, ...]`` (B sequences, or one varlen pack) -> ``[N, length, ...]``, zero-padded at the end."""
    flat = x.reshape(-1, *x.shape[2:])
    flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])  # row `total` is the zero pad
    pad_row = flat.shape[0] - 1
    index = torch.full((len(bounds), length), pad_row, dtype=torch.long)
    for n, (start, size) in enumerate(bounds):
        index[n, :size] = torch.arange(start, start + size)
    return flat[index.to(x.device)]


def from_padded(y: torch.Tensor, bounds: list[tuple[int, int]], like_shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`to_padded`: ``[N, length, ...]`` -> the user's ``[B, T, ...]``."""
    pieces = [y[n, :size] for n, (_, size) in enumerate(bounds)]
    flat = torch.cat(pieces) if pieces else y.new_zeros(0, *y.shape[2:])
    return flat.reshape(like_shape[0], like_shape[1], *y.shape[2:])


# ------------------------------------------------------------------------------------------ preparation

@dataclass
class Prepared:
    """Inputs in compute dtype, prologues applied, q/k repeated to HV heads, padded to ``[N, Tp, HV, ...]``."""

    q: torch.Tensor      # [N, Tp, HV, K], already multiplied by nothing (scale is applied in the math)
    k: torch.Tensor      # [N, Tp, HV, K]
    v: torch.Tensor      # [N, Tp, HV, V]
    g: torch.Tensor      # [N, Tp, HV, K] log decay
    beta: torch.Tensor   # [N, Tp, HV]
    state: torch.Tensor  # [N, HV, K, V] state entering the first token
    bounds: list[tuple[int, int]]


def prepare(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts: KDAOptions,
            pad_to: int = 1) -> Prepared:
    """Apply the prologues and bring everything to the padded per-sequence layout (length a multiple of
    ``pad_to``)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    dtype = compute_dtype(q.dtype)
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if opts.use_qk_l2norm_in_kernel:
        q, k = l2_normalize(q), l2_normalize(k)
    if opts.use_gate_in_kernel:
        g = kda_gate(g, A_log, dt_bias, opts.lower_bound)
    beta = beta_activation(beta, opts)
    if HV != H:  # grouped value heads: value head h uses key head h // (HV // H)
        q = q.repeat_interleave(HV // H, dim=2)
        k = k.repeat_interleave(HV // H, dim=2)

    bounds = sequence_bounds(T, B, cu_seqlens)
    longest = max((size for _, size in bounds), default=0)
    length = max(pad_to, -(-longest // pad_to) * pad_to)
    padded = [to_padded(x, bounds, length) for x in (q, k, v, g, beta)]

    N = len(bounds)
    if initial_state is None:
        state = q.new_zeros(N, HV, K, V)
    else:
        state = initial_state.to(dtype)
        if opts.state_v_first:
            state = state.transpose(-1, -2)
    return Prepared(*padded, state=state, bounds=bounds)


def finish_state(state: torch.Tensor, opts: KDAOptions, like: torch.Tensor) -> torch.Tensor:
    """Internal ``[N, HV, K, V]`` state -> the user's layout and dtype (float32, or float64 for float64)."""
    if opts.state_v_first:
        state = state.transpose(-1, -2)
    return state.to(compute_dtype(like.dtype)).contiguous()


# ------------------------------------------------------------------------------------------------ the math

def kda_recurrent(p: Prepared, scale: float, keep_states: bool = False):
    """Token-by-token recurrence.  Returns ``(o [N, Tp, HV, V], final state [N, HV, K, V], states)``,
    where ``states`` is the state after every token (``[N, Tp, HV, K, V]``) when ``keep_states``."""
    S = p.state
    outputs, states = [], []
    for t in range(p.q.shape[1]):
        q_t, k_t, v_t = p.q[:, t], p.k[:, t], p.v[:, t]
        S = S * p.g[:, t].exp().unsqueeze(-1)                      # forget, per key channel
        u = v_t - torch.einsum("nhkv,nhk->nhv", S, k_t)              # what k_t retrieves, replaced by v_t
        S = S + p.beta[:, t, :, None, None] * k_t.unsqueeze(-1) * u.unsqueeze(-2)
        outputs.append(scale * torch.einsum("nhkv,nhk->nhv", S, q_t))
        if keep_states:
            states.append(S)
    o = torch.stack(outputs, 1) if outputs else p.v.new_zeros(p.v.shape)
    return o, S, (torch.stack(states, 1) if keep_states and states else None)


def _cumulative_log_decay(g):
    """Cumulative log decay over a chunk's tokens (dim 2), split so that a gate with ``exp(g) = 0`` ("forget
    everything", ``g = -inf`` included) never enters a difference (``-inf - -inf`` is NaN).

    Returns ``(G, R)``: ``G`` sums the other gates, ``R`` counts the forget-everything gates so far.  The decay
    from token s to token r (s <= r) is ``exp(G_r - G_s)`` when ``R_r == R_s`` and exactly 0 otherwise; from
    the chunk start to r it is ``exp(G_r)`` when ``R_r == 0``.  This equals the recurrence, where such a gate
    multiplies the state by 0.
    """
    forget_all = g.exp() == 0
    return g.masked_fill(forget_all, 0.0).cumsum(2), forget_all.cumsum(2)


def _causal_matmul(L: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``L @ X`` for a lower-triangular ``L`` in which row r reads rows s <= r of ``X`` only.

    A dense product also multiplies the zeros above L's diagonal by X's later rows, and ``0 * NaN = NaN``
    would carry a non-finite later row into earlier outputs.  Non-finite entries are zeroed before the
    product and marked NaN again in the rows that read them, so rows before them are exactly what they
    would be with any finite value there.
    """
    bad = ~torch.isfinite(X)
    return (L @ X.masked_fill(bad, 0.0)).masked_fill(bad.cumsum(-2) > 0, float("nan"))


def _unit_lower_solve(A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``(I + A)^-1 rhs`` for strictly lower-triangular ``A``: the "UT transform".  Rows of ``A`` with a
    non-finite entry are solved as zeros and their results (and every later row's) marked NaN, so a
    blocked triangular solve cannot mix them into earlier rows."""
    bad = ~torch.isfinite(A)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    T = torch.linalg.solve_triangular(eye + A.masked_fill(bad, 0.0), rhs, upper=False, unitriangular=True)
    return T.masked_fill((bad.any(-1, keepdim=True).cumsum(-2) > 0), float("nan"))


def _chunk_step(q, k, v, g, beta, S, scale):
    """One chunk of the chunkwise form for all sequences and heads at once.

    Shapes ``[N, HV, C, K|V]``, ``beta [N, HV, C]``, ``S [N, HV, K, V]``.  Returns ``(O, S_next)``.
    Causal exactly, also for non-finite inputs: a NaN or inf at token t changes no output before t.
    """
    C = q.shape[2]
    G, R = _cumulative_log_decay(g)                                   # Gamma_r (as G, R), see above
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # D_rs = exp(Gamma_r - Gamma_s) for s <= r only: every exponent evaluated is <= 0 (never exp(-Gamma)).
    keep = causal[:, :, None] & (R.unsqueeze(3) == R.unsqueeze(2))    # [N, HV, C(r), C(s), K]
    D = (G.unsqueeze(3) - G.unsqueeze(2)).masked_fill(~keep, float("-inf")).exp()
    Dk = (D * k.unsqueeze(2)).masked_fill(~causal[:, :, None], 0.0)   # D_rs[c] * k_s[c], zero above r
    A_kk = ((k.unsqueeze(3) * Dk).sum(-1) * beta.unsqueeze(-1)).tril(-1)
    A_qk = scale * (q.unsqueeze(3) * Dk).sum(-1)                      # causal (s <= r) through Dk
    # T = (I + A_kk)^-1 diag(beta): unit lower-triangular solve (the "UT transform").
    Tm = _unit_lower_solve(A_kk, torch.diag_embed(beta))
    from_start = G.masked_fill(R > 0, float("-inf")).exp()           # exp(Gamma_r)
    W = _causal_matmul(Tm, k * from_start)
    U = _causal_matmul(Tm, v)
    V_new = U - W @ S                                                 # what the delta rule writes
    O = scale * (q * from_start) @ S + _causal_matmul(A_qk, V_new)
    G_last, R_last = G[:, :, -1:], R[:, :, -1:]                       # Gamma_C
    to_end = (G_last - G).masked_fill(R != R_last, float("-inf")).exp()  # exp(Gamma_C - Gamma_s)
    whole = G_last.masked_fill(R_last > 0, float("-inf")).exp()       # exp(Gamma_C)
    S_next = whole.transpose(-1, -2) * S + (k * to_end).transpose(-1, -2) @ V_new
    return O, S_next


def kda_chunkwise(p: Prepared, scale: float, chunk_size: int, keep_chunk_states: bool = False):
    """Chunkwise form (``p`` padded to a multiple of ``chunk_size``).  Returns ``(o, final state,
    chunk_states)`` with ``chunk_states [N, NT, HV, K, V]`` the state entering each chunk."""
    N, Tp, HV, _ = p.q.shape
    # [N, Tp, HV, d] -> [N, HV, Tp, d] so each chunk is a contiguous slice of the token axis.
    q, k, v, g = (x.transpose(1, 2) for x in (p.q, p.k, p.v, p.g))
    beta = p.beta.transpose(1, 2)
    S, outs, entering = p.state, [], []
    for start in range(0, Tp, chunk_size):
        sl = slice(start, start + chunk_size)
        if keep_chunk_states:
            entering.append(S)
        O, S = _chunk_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], g[:, :, sl], beta[:, :, sl], S, scale)
        outs.append(O)
    o = torch.cat(outs, 2).transpose(1, 2) if outs else p.v.new_zeros(p.v.shape)
    states = torch.stack(entering, 1) if keep_chunk_states and entering else None
    return o, S, states


# ------------------------------------------------------------------------------------------ entry point

def kda_reference(q, k, v, g, beta, initial_state=None, cu_seqlens=None, A_log=None, dt_bias=None,
                  opts: KDAOptions | None = None, algorithm: str = "chunk"):
    """KDA on user-layout tensors; returns ``(o, final_state)``.

    ``algorithm="chunk"`` uses the chunkwise form, ``"recurrent"`` the token loop.  ``o`` has ``v``'s dtype;
    the state is float32 (float64 for float64 inputs) in the layout ``opts.state_v_first`` asks for.
    """
    opts = opts or KDAOptions(scale=q.shape[-1] ** -0.5)
    if algorithm not in ("chunk", "recurrent"):
        raise ValueError(f"algorithm must be 'chunk' or 'recurrent', got {algorithm!r}")
    pad_to = opts.chunk_size if algorithm == "chunk" else 1
    p = prepare(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts, pad_to=pad_to)
    if algorithm == "chunk":
        o, S, _ = kda_chunkwise(p, opts.scale, opts.chunk_size)
    else:
        o, S, _ = kda_recurrent(p, opts.scale)
    o = from_padded(o, p.bounds, v.shape).to(v.dtype)
    return o, finish_state(S, opts, q)


def kda_reference_chunk_states(q, k, v, g, beta, initial_state=None, cu_seqlens=None, A_log=None,
                               dt_bias=None, opts: KDAOptions | None = None):
    """Like :func:`kda_reference` (chunk form) and also the state entering each chunk, as FLA's
    ``return_intermediate_states``: ``h [B, NT, HV, K, V]`` (varlen: ``[1, total chunks, ...]``) in k's dtype."""
    opts = opts or KDAOptions(scale=q.shape[-1] ** -0.5)
    p = prepare(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias, opts, pad_to=opts.chunk_size)
    o, S, entering = kda_chunkwise(p, opts.scale, opts.chunk_size, keep_chunk_states=True)
    C = opts.chunk_size
    if entering is None:
        entering = p.state.new_zeros(len(p.bounds), 0, *p.state.shape[1:])
    if cu_seqlens is None:
        NT = -(-q.shape[1] // C)
        h = entering[:, :NT]
    else:
        h = torch.cat([entering[n, : -(-size // C)] for n, (_, size) in enumerate(p.bounds)]).unsqueeze(0)
    if opts.state_v_first:
        h = h.transpose(-1, -2)
    o = from_padded(o, p.bounds, v.shape).to(v.dtype)
    return o, finish_state(S, opts, q), h.to(k.dtype).contiguous()
