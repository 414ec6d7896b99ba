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
compute capability whatever the library versions, below a table the user tuned.
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


def load_shipped_table(identity: dict | None = None) -> tuple[dict, str | None]:
    """(entries, file name) of a table shipped in the package for this GPU model, or ({}, None)."""
    identity = identity or machine_identity()
    try:
        folder = resources.files("kda_compile") / "tables"
        names = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".json"))
    except (FileNotFoundError, ModuleNotFoundError, NotADirectoryError):
        return {}, None
    for name in names:
        data = _read(Path(str(folder / name)))
        if data and (data["identity"].get("device"), data["identity"].get("capability")) == \
                (identity["device"], identity["capability"]):
            return data["entries"], name
    return {}, None


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


def write_entries(entries: dict, identity: dict | None = None, path: Path | None = None) -> Path:
    """Merge ``entries`` (bucket key -> winner record) into the table, atomically and under the lock."""
    identity = identity or machine_identity()
    path = path or table_path(identity)
    with _locked(path):
        current = _read(path)
        merged = current["entries"] if current and current["identity"] == identity else {}
        merged.update(entries)
        payload = {"format": FORMAT, "identity": identity, "entries": merged}
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

_cache: dict[str, tuple[dict, dict, str | None, str]] = {}  # device|dir -> (user, shipped, name, path)


def invalidate() -> None:
    """Forget loaded tables (after a write, or when the cache dir changes)."""
    _cache.clear()


def lookup(call) -> tuple[dict, str] | None:
    """The winner record for ``call``'s bucket and where it came from ("tuned table <path>" or
    "shipped table <name>"), or None."""
    from .buckets import bucket_of
    device = call.problem.device
    key = f"{device}|{cache_dir()}"
    if key not in _cache:
        identity = machine_identity(device)
        shipped, shipped_name = load_shipped_table(identity)
        _cache[key] = (load_user_table(identity), shipped, shipped_name, str(table_path(identity)))
    user, shipped, shipped_name, user_path = _cache[key]
    bucket = bucket_of(call).key
    if bucket in user:
        return user[bucket], f"tuned table {user_path}"
    if bucket in shipped:
        return shipped[bucket], f"shipped table {shipped_name}"
    return None
