"""Where the decode kernel reads and writes its states (serving): the compile-time switches, the slot expressions
and the slot tensors the kernel takes.

Without a pool, sequence ``n`` reads (and, in place, writes) row ``n`` of the state.  With ``ssm_state_indices``
the state buffer is a pool:

* ``[N]``: sequence ``n`` reads slot ``idx[n]``; in place, its final state goes back to that slot;
* ``[N, S]`` (speculative decoding, one slot per draft token): the initial state is read from column
  ``num_accepted_tokens[n] - 1`` (column 0 without it); in place, the state after token ``t`` goes to slot
  ``idx[n, t]``, and a negative slot there is not written;
* a negative initial slot is padding: the sequence reads and writes nothing, its output and final state are zeros.

The same rules as the reference backend and the Triton decode kernel.  Each switch is compiled in only when the
call needs it, so a call without a pool runs the plain program.
"""
from __future__ import annotations

from dataclasses import dataclass

import tilelang.language as T
import torch


@dataclass(frozen=True)
class SlotMode:
    """Compile-time switches of the decode kernel's state slots (part of its cache key)."""

    padding: bool = False     # slots come from ssm_state_indices: a negative initial slot skips the sequence
    columns: bool = False     # 2-D indices [N, S]: the slot table has one column per draft token
    accepted: bool = False    # num_accepted_tokens picks the initial column (else column 0)
    per_token: bool = False   # in place with 2-D indices: the state after token t goes to slot idx[n, t]

    @staticmethod
    def from_call(ssm_state_indices, num_accepted_tokens, inplace: bool) -> "SlotMode":
        """The switches of a decode call."""
        columns = ssm_state_indices is not None and ssm_state_indices.dim() == 2
        return SlotMode(padding=ssm_state_indices is not None, columns=columns,
                        accepted=columns and num_accepted_tokens is not None, per_token=columns and inplace)


def initial_slot(mode: SlotMode, slots, accepted, n):
    """Expression: the row of the state buffer holding sequence ``n``'s initial state."""
    if not mode.columns:
        return slots[n]
    return slots[n, accepted[n] - 1] if mode.accepted else slots[n, 0]


def live_tokens(mode: SlotMode, slot, tokens):
    """Expression: the tokens the recurrence runs for a sequence of ``tokens`` tokens, none for padding."""
    return T.if_then_else(slot >= 0, tokens, 0) if mode.padding else tokens


def is_live(mode: SlotMode, slot):
    """Expression: True unless ``slot`` marks padding (a negative slot; only pooled calls have any)."""
    return slot >= 0 if mode.padding else True


def token_slot(slots, n, t):
    """Expression: the slot taking the state after token ``t`` of sequence ``n`` (per-token stores), -1 (not
    written) past the table's columns."""
    return T.if_then_else(t < slots.shape[1], slots[n, t], -1)


def slot_tensors(ssm_state_indices, num_accepted_tokens, sequences: int, device) -> tuple:
    """``(slots, accepted)`` as the kernel takes them (int32): the slot table (``arange(N)`` without a pool) and
    ``num_accepted_tokens`` (empty when absent)."""
    if ssm_state_indices is None:
        slots = torch.arange(sequences, dtype=torch.int32, device=device)
    else:
        slots = ssm_state_indices.to(device=device, dtype=torch.int32).contiguous()
    if num_accepted_tokens is None:
        accepted = torch.empty(0, dtype=torch.int32, device=device)
    else:
        accepted = num_accepted_tokens.to(device=device, dtype=torch.int32).contiguous()
    return slots, accepted
