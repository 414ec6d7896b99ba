"""Out-of-allocation accesses of Triton kernels under the interpreter (``TRITON_INTERPRET=1``).

On a GPU an access outside every allocation is an illegal address, reported late and far from its cause (often
only when a later call synchronises), and an access past a tensor that stays inside the caching allocator's block
is not reported at all; the interpreter reads host memory and reports nothing either.  :func:`checked_accesses`
makes every active (unmasked) load and store of an interpreted kernel check that its address lies inside the
storage of one of the kernel's tensor arguments (all elements of one access in the same storage: a tile that runs
off one tensor into a neighbour on the heap is caught too), and raise :class:`OutOfBoundsAccess` naming the kernel
otherwise.  Accesses past a view but inside its storage are not caught.
"""
from __future__ import annotations

import contextlib

import numpy as np


class OutOfBoundsAccess(AssertionError):
    """An interpreted kernel loaded or stored outside every tensor argument's storage."""


def _storage_ranges(values) -> list[tuple[int, int]]:
    out = []
    for value in values:
        if isinstance(value, (tuple, list)):
            out += _storage_ranges(value)
        elif hasattr(value, "untyped_storage"):
            storage = value.untyped_storage()
            out.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    return out


@contextlib.contextmanager
def checked_accesses():
    """Within the block, interpreted Triton kernels raise :class:`OutOfBoundsAccess` on a load or store outside the
    storages of their tensor arguments.  Yields a dict counting the ``launches`` and the ``accesses`` checked (a
    test can show that its kernels ran under the check)."""
    from triton.runtime import interpreter as it

    frames: list[tuple[str, list[tuple[int, int]]]] = []     # (kernel, ranges) of the kernels being run
    counts = {"launches": 0, "accesses": 0}
    call, load, store = (it.GridExecutor.__call__, it.InterpreterBuilder.create_masked_load,
                         it.InterpreterBuilder.create_masked_store)

    def checked_call(self, *args, **kwargs):
        frames.append((getattr(self.fn, "__name__", "a kernel"), _storage_ranges((*args, *kwargs.values()))))
        counts["launches"] += 1
        try:
            return call(self, *args, **kwargs)
        finally:
            frames.pop()

    def check(ptrs, mask, what):
        if not frames:
            return
        kernel, ranges = frames[-1]
        shape = np.broadcast_shapes(ptrs.data.shape, mask.data.shape)
        addr = np.broadcast_to(ptrs.data, shape)[np.broadcast_to(mask.data, shape)].astype(np.uint64)
        if addr.size == 0:
            return
        counts["accesses"] += 1
        size = np.dtype(it._get_np_dtype(ptrs.get_element_ty())).itemsize
        first, last = int(addr.min()), int(addr.max()) + size
        if any(lo <= first and last <= hi for lo, hi in ranges):
            return
        inside = np.zeros(addr.shape, dtype=bool)
        for lo, hi in ranges:
            inside |= (addr >= lo) & (addr + size <= hi)
        where = (f"{int((~inside).sum())} element(s) outside every tensor argument's storage (the first at "
                 f"{int(addr[~inside][0]):#x})" if not inside.all() else "elements in more than one storage")
        raise OutOfBoundsAccess(f"{kernel}: {what} of {where}")

    def checked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        check(ptrs, mask, "a load")
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def checked_store(self, ptrs, value, mask, cache_policy):
        check(ptrs, mask, "a store")
        return store(self, ptrs, value, mask, cache_policy)

    it.GridExecutor.__call__ = checked_call
    it.InterpreterBuilder.create_masked_load = checked_load
    it.InterpreterBuilder.create_masked_store = checked_store
    try:
        yield counts
    finally:
        it.GridExecutor.__call__ = call
        it.InterpreterBuilder.create_masked_load = load
        it.InterpreterBuilder.create_masked_store = store
