"""Tuned tables: which backend and kernel config won each shape bucket on a given GPU.

One JSON file per machine identity, in the user cache dir (``$KDA_COMPILE_CACHE_DIR``, else
``$XDG_CACHE_HOME/kda_compile``, else ``~/.cache/kda_compile``)::

    {"format": 1,
     "identity": {"device": "NVIDIA H100 80GB HBM3", "capability": "9.0",
                  "torch": "2.11.0", "triton": "3.6.0", "tilelang": "0.1.15"},
     "entries": {"chunk/bf16/K128V128/T8k/dense":
                   {"backend": "tilelang", "config": {...}, "time_ms": 0.61,
                    "shape": "N2 T8192 H16 HV16", "candidates": 12, "rejected": {"...": "reason"}}}}

Writes are atomic (a temporary file renamed over the old one) and serialised between processes by an
advisory lock, merging with what another process wrote meanwhile.  A corrupted file, or one measured with
other library versions, gives one warning and is ignored (dispatch falls back), never a crash.

Tables we measured ship in the package (``kda_compile/tables/*.json``); they apply to the same GPU model and
compute capability whatever the library versions, below a table the user tuned.  A GPU model without a shipped
table borrows one of the same compute capability (one measured with the same SM count first), and the dispatch's
reason says it is borrowed.

Entries are read through :func:`normalize_entries`: keys of the older 5-part form map to the bucket they were
measured in, and within one sequence class every entry is held to the class anchor's backend and bit-changing
knobs (batch invariance).  A record also carries the tuner's progress (``timed``, ``done``), the default's time
(``default``), backends dropped as too slow (``dropped``) and backends outside the dtype's tolerance (``unfit``:
never picked for that dtype, :func:`unfit_backends`).  Entries of the backward (bucket op ``chunk_bwd``) are found
for a chunk call with ``lookup(call, op="chunk_bwd")``.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from importlib import metadata, resources
from pathlib import Path

import torch

FORMAT = 1
_warned: set[str] = set()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def machine_identity(device: torch.device | str | None = None) -> dict:
    """What a table is keyed by: device name, compute capability and library versions."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" or device is None and torch.cuda.is_available():
        index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        capability = "%d.%d" % torch.cuda.get_device_capability(index)
    else:
        name, capability = "cpu", "none"
    return {"device": name, "capability": capability, "torch": torch.__version__.split("+")[0],
            "triton": _version("triton"), "tilelang": _version("tilelang")}


def cache_dir() -> Path:
    """The directory for tuned tables and compiled-kernel caches."""
    if os.environ.get("KDA_COMPILE_CACHE_DIR"):
        return Path(os.environ["KDA_COMPILE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kda_compile"


def _slug(identity: dict) -> str:
    text = f"{identity['device']}-sm{identity['capability']}"
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def table_path(identity: dict | None = None) -> Path:
    """Where this machine's tuned table lives."""
    return cache_dir() / "tuned" / f"{_slug(identity or machine_identity())}.json"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _read(path: Path) -> dict | None:
    """A table's contents, or None (with one warning) when missing, corrupted or malformed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        _warn_once(str(path), f"kda_compile: cannot read tuned table {path}: {exc}; ignoring it")
        return None
    try:
        data = json.loads(text)
        if data.get("format") != FORMAT or not isinstance(data.get("entries"), dict) \
                or not isinstance(data.get("identity"), dict):
            raise ValueError("unknown format")
    except (ValueError, AttributeError) as exc:
        _warn_once(str(path), f"kda_compile: tuned table {path} is corrupted ({exc}); ignoring it "
                              f"(re-run `python -m kda_compile.autotune` to rebuild it)")
        return None
    return data


def load_user_table(identity: dict | None = None) -> dict:
    """Entries of the user's table for this machine; {} if absent, corrupted or from other versions."""
    identity = identity or machine_identity()
    path = table_path(identity)
    data = _read(path)
    if data is None:
        return {}
    if data["identity"] != identity:
        _warn_once(str(path) + "identity", f"kda_compile: tuned table {path} was measured with "
                                           f"{data['identity']}, this process has {identity}; ignoring it "
                                           f"(re-run `python -m kda_compile.autotune`)")
        return {}
    return data["entries"]


def _shipped_tables() -> list[tuple[str, dict]]:
    """(file name, contents) of every table shipped in the package, sorted by name."""
    try:
        folder = resources.files("kda_compile") / "tables"
        names = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".json"))
    except (FileNotFoundError, ModuleNotFoundError, NotADirectoryError):
        return []
    out = []
    for name in names:
        data = _read(Path(str(folder / name)))
        if data:
            out.append((name, data))
    return out


def load_shipped_table(identity: dict | None = None) -> tuple[dict, str | None]:
    """(entries, file name) of a table shipped in the package for this GPU model, or ({}, None)."""
    identity = identity or machine_identity()
    for name, data in _shipped_tables():
        if (data["identity"].get("device"), data["identity"].get("capability")) == \
                (identity["device"], identity["capability"]):
            return data["entries"], name
    return {}, None


def borrow_shipped_table(identity: dict, sms: int | None = None) -> tuple[dict, str | None, str | None]:
    """A shipped table of another GPU model with the same compute capability, for a GPU that has none of its
    own: ``(entries, file name, note)``; a table measured with the same SM count is preferred, then one measured
    with the current tuner (not carried over from an older key form).  The parallelism
    classes are recomputed with this GPU's SM count, so only the tile choices are borrowed."""
    if identity.get("capability") in (None, "none"):
        return {}, None, None
    same = [(name, data) for name, data in _shipped_tables()
            if data["identity"].get("capability") == identity["capability"]]
    # same SM count first, then tables measured by the current tuner (stable)
    same.sort(key=lambda item: (item[1].get("sm_count") != sms, "carried_over" in item[1]))
    if not same:
        return {}, None, None
    name, data = same[0]
    theirs = data.get("sm_count")
    sm_note = "" if theirs is None or sms is None else \
        (", same SM count" if theirs == sms else f", {theirs} SMs there against {sms} here")
    return data["entries"], name, (f"borrowed: measured on {data['identity'].get('device')}, same compute "
                                   f"capability {identity['capability']}{sm_note}")


def normalize_entries(entries: dict) -> tuple[dict, list[str]]:
    """Entries keyed by current bucket keys, batch invariance enforced, and notes on what changed.

    Older keys map to the bucket they were measured in (:meth:`Bucket.parse`); keys that cannot be read are
    ignored with a note.  Within one sequence class (:attr:`Bucket.sequence_key`) every entry must use the
    backend and the bit-changing knobs of the class's anchor (the entry marked ``"anchor"``, else the first
    key): a bit-changing knob that differs is replaced by the anchor's, an entry of another backend is dropped."""
    from .buckets import Bucket, bit_changing_part, with_bit_changing
    out, notes = {}, []
    for key, record in entries.items():
        try:
            bucket = Bucket.parse(key)
        except ValueError as exc:
            notes.append(f"ignored entry {key!r}: {exc}")
            continue
        if not isinstance(record, dict) or "backend" not in record:
            notes.append(f"ignored entry {key!r}: no backend")
            continue
        if bucket.key != key:
            notes.append(f"entry {key!r} read as {bucket.key!r}")
        out[bucket.key] = dict(record, bucket=bucket.key)
    anchors: dict[str, str] = {}
    for key in sorted(out, key=lambda k: (not out[k].get("anchor"), k)):
        anchors.setdefault(Bucket.parse(key).sequence_key, key)
    for key in sorted(out):
        anchor_key = anchors[Bucket.parse(key).sequence_key]
        if key == anchor_key:
            continue
        record, anchor = out[key], out[anchor_key]
        if record["backend"] != anchor["backend"]:
            notes.append(f"dropped entry {key!r}: backend {record['backend']} differs from {anchor['backend']} of "
                         f"{anchor_key!r} in the same sequence class (batch invariance)")
            del out[key]
            continue
        fixed = dict(record)
        missing = {n: r for n, r in anchor.get("per_backend", {}).items() if n not in record.get("per_backend", {})}
        if missing:  # a forced backend must run the class's bit-changing knobs here too
            fixed["per_backend"] = {**record.get("per_backend", {}), **missing}
        for name, mine in [(None, record)] + list(record.get("per_backend", {}).items()):
            backend = name or record["backend"]
            theirs = anchor if name is None else anchor.get("per_backend", {}).get(name)
            if theirs is None or "config" not in mine:
                continue
            want = bit_changing_part(backend, theirs.get("config", {}))
            if bit_changing_part(backend, mine["config"]) != want:
                notes.append(f"entry {key!r}: {backend}'s bit-changing knobs set to those of {anchor_key!r}")
                new = with_bit_changing(backend, mine["config"], want)
                if name is None:
                    fixed["config"] = new
                else:
                    fixed["per_backend"] = {**fixed.get("per_backend", {}), name: {**mine, "config": new}}
        out[key] = fixed
    return out, notes


@contextlib.contextmanager
def _locked(path: Path):
    """Advisory inter-process lock next to ``path`` (no-op where fcntl is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as handle:
        try:
            import fcntl
            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


def write_entries(entries: dict, identity: dict | None = None, path: Path | None = None,
                  sm_count: int | None = None) -> Path:
    """Merge ``entries`` (bucket key -> winner record) into the table, atomically and under the lock;
    ``sm_count`` (the GPU's SMs) is kept beside the identity, for tables that other GPUs borrow."""
    identity = identity or machine_identity()
    path = path or table_path(identity)
    with _locked(path):
        current = _read(path)
        merged = current["entries"] if current and current["identity"] == identity else {}
        merged.update(entries)
        payload = {"format": FORMAT, "identity": identity, "entries": merged}
        if sm_count or (current and current.get("sm_count")):
            payload["sm_count"] = sm_count or current["sm_count"]
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(payload, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    invalidate()
    return path


# ------------------------------------------------------------------------------------- dispatch lookup

_cache: dict[str, tuple] = {}  # device|dir -> ((entries, source) of the user table, then the shipped one)
_notes: dict[str, list[str]] = {}  # source -> what normalize_entries changed


def invalidate() -> None:
    """Forget loaded tables (after a write, or when the cache dir changes)."""
    _cache.clear()
    _notes.clear()


def _tables(device) -> tuple:
    from .buckets import sm_count
    key = f"{device}|{cache_dir()}"
    if key not in _cache:
        identity = machine_identity(device)
        user, user_notes = normalize_entries(load_user_table(identity))
        user_source = f"tuned table {table_path(identity)}"
        shipped, name = load_shipped_table(identity)
        source = f"shipped table {name}"
        if name is None:
            shipped, name, note = borrow_shipped_table(identity, sm_count(device))
            source = f"shipped table {name} ({note})"
        shipped, shipped_notes = normalize_entries(shipped)
        _notes[user_source], _notes[source] = user_notes, shipped_notes
        for note in user_notes:
            _warn_once(user_source + note, f"kda_compile: {user_source}: {note}")
        _cache[key] = tuple(_indexed(entries, src) for entries, src in
                            ((user, user_source), (shipped, source) if name else ({}, None)))
    return _cache[key]


def _indexed(entries: dict, source: str | None) -> tuple:
    """(entries, source, {sequence key: its keys, anchor first}, {(op, dtype): {backend: reason}}), so a
    lookup parses no keys."""
    from .buckets import Bucket
    classes: dict[str, list[str]] = {}
    unfit: dict[tuple, dict[str, str]] = {}
    for key in sorted(entries, key=lambda k: (not entries[k].get("anchor"), k)):
        bucket = Bucket.parse(key)
        classes.setdefault(bucket.sequence_key, []).append(key)
        for name, why in entries[key].get("unfit", {}).items():
            unfit.setdefault((bucket.op, bucket.dtype), {}).setdefault(
                name, f"misses the {bucket.dtype} tolerance ({source}, {key}: {why})")
    return entries, source, classes, unfit


def table_notes() -> dict[str, list[str]]:
    """Per loaded table, what loading changed (older keys mapped, entries ignored or fixed for invariance)."""
    return dict(_notes)


def lookup(call, op: str | None = None) -> tuple[dict, str] | None:
    """The record for ``call``'s bucket and where it came from ("tuned table <path>" or "shipped table
    <name>", with "borrowed: ..." for another GPU model's), or None.  ``op``: the tuned op when not the call's
    own (``chunk_bwd``: the backward of a chunk call).

    One table answers for a whole sequence class (the user's when it has an entry of the class, else the
    shipped one), so every bucket of the class runs the same backend and bit-changing knobs: the bucket's own
    entry, else the class entry of any parallelism, else the class's anchor (another layout or parallelism)."""
    from .buckets import bucket_of
    bucket = bucket_of(call, op=op)
    for entries, source, classes, _ in _tables(call.problem.device):
        same_class = classes.get(bucket.sequence_key)
        if not same_class:
            continue
        for key in (bucket.key, bucket.any_parallelism().key):
            if key in entries:
                return entries[key], source
        return entries[same_class[0]], f"{source}, from bucket {same_class[0]} of the same sequence class"
    return None


def unfit_backends(call, op: str | None = None) -> dict[str, str]:
    """Backends the tables found outside the tolerance of ``call``'s dtype (any bucket of that op and dtype;
    ``op`` as in :func:`lookup`): {backend: reason}.  The dispatch never picks them for that dtype."""
    from .buckets import DTYPE_NAMES
    wanted = (op or call.op, DTYPE_NAMES.get(call.problem.dtype))
    out: dict[str, str] = {}
    for _, _, _, unfit in _tables(call.problem.device):
        for name, why in unfit.get(wanted, {}).items():
            out.setdefault(name, why)
    return out
