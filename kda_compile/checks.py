"""Input checking for the public API.

Every bad input becomes a ``ValueError`` (shapes, values) or ``TypeError`` (types, dtypes) that names the
argument and what was expected.  The result of a successful check is a :class:`Problem`: the sizes every
backend and the dispatch need.

Shapes, dtypes, devices and scalar options are always checked: that costs nothing.  A check of tensor
*contents* (offsets, pool indices, the sign of ``g``) on a GPU would wait for the device, so it runs only
where reading the values is free (CPU tensors, or ``cu_seqlens_cpu``) or when the environment variable
``KDA_COMPILE_DEBUG=1`` was set before import (:data:`DEBUG`); never while ``torch.compile`` traces.
"""
from __future__ import annotations

import collections
import os
import warnings
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# FLA keywords that have no meaning here, with FLA 0.6.0's default for each.  The default is accepted (code
# written for FLA may spell it out); any other value is refused, never ignored.
FLA_ONLY_KEYWORDS = {"cp_context": None, "use_graph": False, "max_num_seqs": None}
DEBUG_ENV = "KDA_COMPILE_DEBUG"
# Content checks that need a device sync (positive g, offsets and pool indices on a GPU); read once, at import.
DEBUG = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


class Problem(NamedTuple):
    """Sizes of one KDA call (N = number of sequences: B, or len(cu_seqlens) - 1).  A named tuple, not a frozen
    dataclass: every call builds one, and a frozen dataclass costs 1.6 µs to build against 0.3 µs."""

    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    N: int
    varlen: bool
    dtype: torch.dtype
    device: torch.device


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _tensor(name: str, x, *, ndim: int | None = None, expected: str = "") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' of shape ' + expected if expected else ''}, "
                        f"got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have shape {expected} ({ndim} dims), got {_shape(x)}")
    return x


def _float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _expect_shape(name: str, x: torch.Tensor, shape: tuple, text: str) -> None:
    if x.shape != tuple(shape):   # torch.Size is a tuple
        raise ValueError(f"{name} must have shape {text} = {list(shape)}, got {_shape(x)}")


def _is_default(value, default) -> bool:
    if value is default:
        return True
    return default is not None and isinstance(value, (bool, int)) and value == default


def reject_unknown_keywords(kwargs: dict, function: str) -> None:
    """FLA-only keywords (``cp_context``, ``use_graph``, ``max_num_seqs``) are accepted with FLA's default
    value and raise a clear ValueError with any other; anything else is an ordinary unexpected keyword."""
    for key, value in kwargs.items():
        if key in FLA_ONLY_KEYWORDS:
            if _is_default(value, FLA_ONLY_KEYWORDS[key]):
                continue
            raise ValueError(f"{function}: `{key}` (flash-linear-attention context parallel / graph mode) is "
                             f"not supported here; leave it at its default ({key}={FLA_ONLY_KEYWORDS[key]!r}) or "
                             f"remove it (chunk_kda takes cp_context: kda_compile.context_parallel)")
        raise TypeError(f"{function}() got an unexpected keyword argument '{key}'")


def legacy_state_layout(kwargs: dict, state_v_first: bool) -> bool:
    """FLA's deprecated ``transpose_state_layout=`` (removed from ``kwargs``) is ``state_v_first``, with a
    DeprecationWarning; passing both is an error.  Returns the state_v_first to use.  Texts are FLA's."""
    if "transpose_state_layout" not in kwargs:
        return state_v_first
    if state_v_first:
        raise ValueError("Cannot pass both `state_v_first` and the deprecated `transpose_state_layout`.")
    warnings.warn("`transpose_state_layout` is deprecated and renamed to `state_v_first`.", DeprecationWarning,
                  stacklevel=3)
    return bool(kwargs.pop("transpose_state_layout"))


def _values_are_free(x: torch.Tensor) -> bool:
    """Whether ``x``'s values can be read without waiting for a device (and without breaking a trace)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_values() -> bool:
    return DEBUG and not torch.compiler.is_compiling()


def check_cu_seqlens(cu_seqlens, T: int, B: int, cu_seqlens_cpu=None, device=None) -> int:
    """Validate varlen offsets; returns N.  Their values are checked when reading them is free
    (``cu_seqlens_cpu`` given, or a CPU tensor) or with :data:`DEBUG`."""
    _tensor("cu_seqlens", cu_seqlens, ndim=1, expected="[N + 1]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape [N + 1] with N >= 1, got {_shape(cu_seqlens)}")
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch size B must be 1 (sequences packed along T), got B={B}")
    if device is not None and cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if cu_seqlens_cpu is not None:
        _tensor("cu_seqlens_cpu", cu_seqlens_cpu, ndim=1, expected="[N + 1]")
        if cu_seqlens_cpu.shape != cu_seqlens.shape:
            raise ValueError(f"cu_seqlens_cpu must have the shape of cu_seqlens {_shape(cu_seqlens)}, "
                             f"got {_shape(cu_seqlens_cpu)}")
    if torch.compiler.is_compiling():  # values are data; reading them would break the graph
        return cu_seqlens.shape[0] - 1
    if cu_seqlens_cpu is not None:     # the caller's host copy: free to read
        values = cu_seqlens_cpu.tolist()
    elif _values_are_free(cu_seqlens) or DEBUG:
        values = cu_seqlens.tolist()
    else:
        return cu_seqlens.shape[0] - 1
    if values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values[:-1], values[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing (sequence lengths >= 0), got {values}")
    if values[-1] != T:
        raise ValueError(f"cu_seqlens must end at T = {T} (the packed token count), got {values[-1]}")
    return len(values) - 1


def check_state(name: str, state, N: int, HV: int, K: int, V: int, state_v_first: bool, q: torch.Tensor,
                pool: bool = False) -> None:
    """The recurrent state: ``[N, HV, K, V]`` (``[N, HV, V, K]`` with state_v_first), float32 (float64 for
    float64 inputs).  With ``pool`` the first dimension is the pool size, not N."""
    layout = "[N, HV, V, K]" if state_v_first else "[N, HV, K, V]"
    _tensor(name, state, ndim=4, expected=layout)
    tail = (HV, V, K) if state_v_first else (HV, K, V)
    if tuple(state.shape[1:]) != tail or (not pool and state.shape[0] != N):
        want = ["pool size" if pool else N, *tail]
        raise ValueError(f"{name} must have shape {layout} = {want}, got {_shape(state)}")
    allowed = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
    if state.dtype not in allowed:
        raise TypeError(f"{name} must be float32{' or float64' if len(allowed) > 1 else ''}, got {state.dtype}")
    if state.device != q.device:
        raise ValueError(f"{name} is on {state.device} but q is on {q.device}")


def check_inputs(q, k, v, g, beta, *, initial_state=None, cu_seqlens=None, cu_seqlens_cpu=None,
                 A_log=None, dt_bias=None, scale=None, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                 allow_neg_eigval=False, safe_gate=False, lower_bound=None, chunk_size=64, state_v_first=False,
                 state_is_pool=False) -> Problem:
    """Check the arguments shared by ``chunk_kda`` and ``fused_recurrent_kda``; returns the :class:`Problem`."""
    _tensor("q", q, ndim=4, expected="[B, T, H, K]")
    B, T, H, K = q.shape
    _tensor("k", k, ndim=4, expected="[B, T, H, K]")
    _expect_shape("k", k, q.shape, "[B, T, H, K] (the shape of q)")
    _tensor("v", v, ndim=4, expected="[B, T, HV, V]")
    if v.shape[0] != B or v.shape[1] != T:
        raise ValueError(f"v must have shape [B, T, HV, V] with B={B}, T={T} (from q), got {_shape(v)}")
    HV, V = v.shape[2], v.shape[3]
    if H == 0 or HV % H != 0:
        raise ValueError(f"the value heads HV={HV} (v.shape[2]) must be a positive multiple of the key heads "
                         f"H={H} (q.shape[2])")
    if K == 0 or V == 0:
        raise ValueError(f"head dims must be positive, got K={K}, V={V}")
    _tensor("g", g, ndim=4, expected="[B, T, HV, K]")
    _expect_shape("g", g, (B, T, HV, K), "[B, T, HV, K]")
    _tensor("beta", beta, ndim=3, expected="[B, T, HV]")
    _expect_shape("beta", beta, (B, T, HV), "[B, T, HV]")

    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        _float(name, x)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    device = q.device
    for name, x in (("k", k), ("v", v), ("g", g), ("beta", beta)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but q is on {device}; all inputs must share a device")

    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if chunk_size not in (32, 64):  # FLA's text, so code that matches FLA's message keeps working
        raise ValueError(f"`chunk_size` must be either 32 or 64 for KDA, got {chunk_size}.")
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True (beta given as logits)")
    if lower_bound is not None and not isinstance(lower_bound, (int, float)):
        raise TypeError(f"lower_bound must be a float or None, got {type(lower_bound).__name__}")
    if safe_gate and use_gate_in_kernel:
        if lower_bound is None:
            raise ValueError("safe_gate=True with use_gate_in_kernel=True needs lower_bound (e.g. -5)")
        if not -5 <= lower_bound < 0:
            raise ValueError(f"lower_bound must lie in the safe range [-5, 0), got {lower_bound}")

    if use_gate_in_kernel:
        if A_log is None and lower_bound is None:
            raise ValueError("use_gate_in_kernel=True needs A_log of shape [HV] (or lower_bound for the "
                             "sigmoid gate without A_log)")
        if A_log is not None:
            _tensor("A_log", A_log, expected="[HV]")
            _float("A_log", A_log)
            if A_log.numel() != HV:
                raise ValueError(f"A_log must have shape [HV] = [{HV}], got {_shape(A_log)}")
            if A_log.device != q.device:
                raise ValueError(f"A_log is on {A_log.device} but q is on {q.device}")
        if dt_bias is not None:
            _tensor("dt_bias", dt_bias, expected="[HV * K]")
            _float("dt_bias", dt_bias)
            if dt_bias.numel() != HV * K:
                raise ValueError(f"dt_bias must have shape [HV * K] = [{HV * K}], got {_shape(dt_bias)}")
            if dt_bias.device != q.device:
                raise ValueError(f"dt_bias is on {dt_bias.device} but q is on {q.device}")

    if cu_seqlens is not None:
        N = check_cu_seqlens(cu_seqlens, T, B, cu_seqlens_cpu, device=q.device)
    else:
        if cu_seqlens_cpu is not None:
            raise ValueError("cu_seqlens_cpu was given without cu_seqlens")
        N = B
    if initial_state is not None:
        check_state("initial_state", initial_state, N, HV, K, V, state_v_first, q, pool=state_is_pool)
    if not use_gate_in_kernel and _check_values():
        check_gate_values(g)
    return Problem(B=B, T=T, H=H, HV=HV, K=K, V=V, N=N, varlen=cu_seqlens is not None, dtype=q.dtype,
                   device=device)


def check_gate_values(g: torch.Tensor) -> None:
    """``g`` given as log-space decay must be <= 0 (``exp(g)`` in [0, 1]); positive, +inf or NaN values are
    unsupported.  Reads the values (a device sync): run with :data:`DEBUG` only."""
    if g.numel() == 0:
        return
    if bool(torch.isnan(g).any()):
        raise ValueError("g contains NaN (g is the log-space decay, expected <= 0)")
    top = float(g.max())
    if top > 0:
        raise ValueError(f"g must be <= 0 (log-space decay; positive g is unsupported), got a maximum of {top}")


def check_serving(problem: Problem, initial_state, ssm_state_indices, num_accepted_tokens,
                  inplace_final_state: bool, cu_seqlens=None) -> None:
    """The serving arguments: a state pool indexed by ``ssm_state_indices`` (``[N]`` or ``[N, S]``),
    speculative decoding (``num_accepted_tokens [N]``) and the in-place update.  A negative slot is padding
    (that sequence is skipped).  Shapes, dtypes and the pool's layout are always checked; index values
    (range, no slot written twice, accepted tokens within the tokens given) when reading them is free (CPU
    tensors) or with :data:`DEBUG`."""
    if inplace_final_state and initial_state is None:
        raise ValueError("inplace_final_state=True needs initial_state (the state, or state pool, to update)")
    if inplace_final_state and not initial_state.is_contiguous():
        raise ValueError(f"inplace_final_state=True needs a contiguous initial_state (the state pool is updated in "
                         f"place), got strides {tuple(initial_state.stride())} for shape {_shape(initial_state)}")
    if num_accepted_tokens is not None and ssm_state_indices is None:
        raise ValueError("num_accepted_tokens needs ssm_state_indices of shape [N, S] (speculative decoding)")
    if ssm_state_indices is None:
        return
    if initial_state is None:
        raise ValueError("ssm_state_indices needs initial_state: the state pool [P, HV, K, V] it indexes")
    if not isinstance(ssm_state_indices, torch.Tensor) or ssm_state_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError("ssm_state_indices must be an int32 or int64 tensor of shape [N] or [N, S]")
    if ssm_state_indices.dim() not in (1, 2) or ssm_state_indices.shape[0] != problem.N:
        raise ValueError(f"ssm_state_indices must have shape [N] or [N, S] with N={problem.N}, "
                         f"got {_shape(ssm_state_indices)}")
    if ssm_state_indices.device != initial_state.device:
        raise ValueError(f"ssm_state_indices is on {ssm_state_indices.device} but the pool (initial_state) is on "
                         f"{initial_state.device}")
    if num_accepted_tokens is not None:
        if ssm_state_indices.dim() != 2:
            raise ValueError("num_accepted_tokens needs 2-D ssm_state_indices [N, S]")
        if (not isinstance(num_accepted_tokens, torch.Tensor) or num_accepted_tokens.dtype.is_floating_point
                or tuple(num_accepted_tokens.shape) != (problem.N,)):
            raise ValueError(f"num_accepted_tokens must be an integer tensor of shape [N] = [{problem.N}]")
    if ssm_state_indices.numel() and (_values_are_free(ssm_state_indices) or _check_values()):
        check_slot_values(ssm_state_indices, initial_state.shape[0], inplace_final_state)
    if num_accepted_tokens is not None and num_accepted_tokens.numel() and (
            _values_are_free(num_accepted_tokens) or _check_values()):
        check_accepted_values(num_accepted_tokens, ssm_state_indices.shape[1], problem, cu_seqlens)


_SMALL = 256   # index tensors up to this size are checked as Python lists on the CPU


def check_slot_values(slots: torch.Tensor, pool: int, written: bool) -> None:
    """Pool slots lie in ``[0, pool)`` (negative: padding); with ``written`` no slot appears twice (two
    sequences, or two tokens, would write one slot).  Reads the values: free on the CPU, a sync on a GPU."""
    if slots.numel() <= _SMALL and slots.device.type == "cpu":  # a decode batch: Python beats three tensor ops
        values = [s for s in slots.flatten().tolist() if s >= 0]
        top = max(values, default=-1)
        repeated = []
        if written and len(set(values)) != len(values):   # counted only when some slot repeats
            repeated = sorted(s for s, n in collections.Counter(values).items() if n > 1)
    else:
        used = slots[slots >= 0]
        top = int(used.max()) if used.numel() else -1
        repeated = []
        if written and used.numel() and torch.unique(used).numel() != used.numel():
            values, counts = torch.unique(used, return_counts=True)
            repeated = values[counts > 1].tolist()
    if top >= pool:
        raise ValueError(f"ssm_state_indices must lie in [0, {pool}) (the pool size, initial_state.shape[0]; "
                         f"negative values mark padding), got a maximum of {top}")
    if repeated:
        raise ValueError(f"ssm_state_indices repeats slot(s) {repeated}: with inplace_final_state=True two "
                         f"writes would go to one slot")


def check_accepted_values(num_accepted_tokens, columns: int, problem: Problem, cu_seqlens=None) -> None:
    """``num_accepted_tokens[n]`` lies in ``[1, S]`` (the index columns) and within sequence n's tokens."""
    lo, hi = int(num_accepted_tokens.min()), int(num_accepted_tokens.max())
    if lo < 1 or hi > columns:
        raise ValueError(f"num_accepted_tokens must lie in [1, {columns}], got {lo}..{hi}")
    if cu_seqlens is None:
        lengths = torch.full_like(num_accepted_tokens, problem.T)
    elif _values_are_free(cu_seqlens) or _check_values():
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(num_accepted_tokens.device)
    else:
        return
    over = (num_accepted_tokens.to(lengths.dtype) > lengths).nonzero().flatten().tolist()
    if over:
        n = over[0]
        raise ValueError(f"num_accepted_tokens[{n}] = {int(num_accepted_tokens[n])} is larger than the "
                         f"{int(lengths[n])} tokens given for sequence {n}")


def check_chunk_pool(problem: Problem, initial_state, ssm_state_indices, inplace_final_state: bool,
                     return_intermediate_states: bool = False, cu_seqlens=None) -> None:
    """The state-pool arguments of ``chunk_kda``: 1-D ``ssm_state_indices [N]`` (one slot per sequence), and
    ``inplace_final_state`` (which needs the pool, or a state, to write to)."""
    if isinstance(ssm_state_indices, torch.Tensor) and ssm_state_indices.dim() != 1:
        raise ValueError(f"chunk_kda takes ssm_state_indices of shape [N] = [{problem.N}] (one slot per sequence; "
                         f"per-token slots are fused_recurrent_kda's), got {_shape(ssm_state_indices)}")
    if return_intermediate_states:
        raise ValueError("return_intermediate_states=True cannot be combined with ssm_state_indices / "
                         "inplace_final_state")
    check_serving(problem, initial_state, ssm_state_indices, None, inplace_final_state, cu_seqlens)
