"""Where entry ``S[c, column]`` of a head's state lives in a state buffer: ``[rows, HV, K, V]``, or
``[rows, HV, V, K]`` with ``state_v_first`` (FLA's transposed layout).  Plain Python returning TileLang
expressions and statements, so a kernel reads and writes either layout with one line."""
from __future__ import annotations

import tilelang.language as T


def state_index(row, hv, c, column, state_v_first: bool) -> tuple:
    """Index of ``S[c, column]`` of head ``hv`` in row ``row`` (sequence or pool slot) of a state buffer."""
    return (row, hv, column, c) if state_v_first else (row, hv, c, column)


def state_entry(buf, row, hv, c, column, state_v_first: bool, skip_negative_row: bool = False):
    """The value ``S[c, column]`` of head ``hv`` in row ``row`` of ``buf``; with ``skip_negative_row`` a negative
    row (a padding slot of a state pool) reads nothing and gives 0."""
    entry = buf[state_index(row, hv, c, column, state_v_first)]
    return T.if_then_else(row >= 0, entry, 0.0) if skip_negative_row else entry


def store_state_entry(buf, value, row, hv, c, column, state_v_first: bool):
    """The statement ``S[c, column] = value`` for head ``hv`` in row ``row`` of ``buf``."""
    return T.buffer_store(buf, value, list(state_index(row, hv, c, column, state_v_first)))


@T.macro
def load_state_tile(ops, S, buf, row, hv, v0, has_state: bool, state_v_first: bool, skip_negative_row: bool = False):
    """``S [K, BV]`` = columns ``v0 ..`` of head ``hv``'s state in row ``row`` of ``buf``, or zeros without a
    state (and, with ``skip_negative_row``, for a negative row)."""
    if has_state:
        for c, j in ops.Parallel(S.shape[0], S.shape[1]):
            S[c, j] = state_entry(buf, row, hv, c, v0 + j, state_v_first, skip_negative_row)
    else:
        T.clear(S)
