"""Compiled Triton kernels shipped with the package, so that a first call does not wait on the compilers.

A cold process spends seconds before its first Triton forward finishes: Triton lowers each kernel through MLIR and
LLVM, runs ``ptxas``, and (Triton 3.6) builds a C launcher per kernel signature with the host's C compiler.  All of
that lands in Triton's own cache (``~/.triton/cache`` or ``TRITON_CACHE_DIR``), one folder per key, where the key
hashes Triton's installation, the kernel's source, the GPU target and the compile options.  This module ships the
binary part of those folders (cubins, their metadata, the launchers) for the common first calls on one GPU
architecture and one Triton wheel, and copies them into the user's Triton cache, through Triton's cache-manager
API, the first time a Triton kernel runs in the process.  Triton then finds them under the keys it computes
itself; nothing is loaded that Triton would not have built the same way.

An artefact set lives in ``prebuilt/<tag>/`` (tag: ``triton-<version>-sm<major><minor>``) with a ``manifest.json``.
It is installed only where everything the keys depend on matches: the Triton version and its installation hash,
the GPU's compute capability, the Python ABI, and a hash of this package's Triton kernel sources (the kernels and
the module constants they may read, :func:`kernel_sources_hash`; the artefacts of edited kernels would never be
hit, so a stale set is left alone and :func:`status` says so).  Anything the set does not cover compiles on first
use, as before.  ``python -m kda_compile.prebuild`` makes a set on a GPU.
"""
from __future__ import annotations

import ast
import base64
import datetime
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).parent / "prebuilt"
KEEP_SUFFIXES = (".cubin", ".hsaco", ".json", ".so")   # binaries, metadata, launchers; no IR text
GROUP_PREFIX = "__grp__"

_installed: dict[str, str] = {}   # device -> what install() did
DONE = False   # install() ran for a CUDA device (the first one's architecture is the one installed)


def kernel_sources_hash(folder: Path | None = None) -> str:
    """sha256 over what Triton's keys can depend on in this package's modules that define Triton kernels: per
    module (by file name), the exact text of every top-level ``@triton.jit`` function, decorators included, with
    the line it starts on (Triton's key holds it), and of every top-level assignment (constants a kernel may read).
    Host code, docstrings and comments outside those leave it unchanged as long as no kernel moves to another
    line, so such edits do not make a shipped set stale."""
    h = hashlib.sha256()
    for path in sorted((folder or Path(__file__).parent).glob("*.py")):
        text = path.read_text()
        if not re.search(r"^@triton\.jit", text, re.MULTILINE):
            continue
        h.update(path.name.encode() + b"\0")
        lines = text.splitlines()
        for node in ast.parse(text).body:
            decorators = [ast.get_source_segment(text, d).split("(")[0] for d in getattr(node, "decorator_list", [])]
            jit = isinstance(node, ast.FunctionDef) and bool({"triton.jit", "jit"} & set(decorators))
            if jit:   # from its first decorator, the line Triton's key holds
                start = node.decorator_list[0].lineno
                h.update(f"{start}:".encode() + "\n".join(lines[start - 1:node.end_lineno]).encode() + b"\0")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):   # a constant: its text, wherever it stands
                h.update(b"0:" + "\n".join(lines[node.lineno - 1:node.end_lineno]).encode() + b"\0")
    return h.hexdigest()


def triton_installation_hash() -> str | None:
    """sha256 of Triton's own cache-key prefix (its version and installed files), None where Triton hides it."""
    for module in ("triton.runtime.cache", "triton.compiler.compiler"):
        try:
            key_fn = getattr(__import__(module, fromlist=["triton_key"]), "triton_key")
        except (ImportError, AttributeError):
            continue
        return hashlib.sha256(key_fn().encode()).hexdigest()
    return None


def abi_tag() -> str:
    """The Python ABI the launchers are built for (their file suffix), e.g. ``.cpython-312-x86_64-linux-gnu.so``."""
    return sysconfig.get_config_var("EXT_SUFFIX") or ""


def tag_for(triton_version: str, capability: tuple[int, int]) -> str:
    return f"triton-{triton_version}-sm{capability[0]}{capability[1]}"


def _decode_key(folder: str) -> str:
    """The hex key whose base32 form names a Triton cache folder (``get_cache_manager`` encodes it again)."""
    return base64.b32decode(folder + "=" * (-len(folder) % 8)).hex()


def shipped_tags() -> list[str]:
    """The artefact sets this package ships (folder names under :data:`ROOT`)."""
    return sorted(p.name for p in ROOT.iterdir() if p.is_dir()) if ROOT.is_dir() else []


def load_manifest(tag: str) -> dict | None:
    path = ROOT / tag / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def mismatch(manifest: dict, triton_version: str, capability: tuple[int, int]) -> str | None:
    """Why ``manifest``'s artefacts cannot be hit on this machine, or None."""
    if manifest.get("triton") != triton_version:
        return f"made with Triton {manifest.get('triton')}, this is {triton_version}"
    if tuple(manifest.get("capability", ())) != tuple(capability):
        return f"made for compute capability {tuple(manifest.get('capability', ()))}, this GPU is {capability}"
    if manifest.get("abi") != abi_tag():
        return f"launchers built for {manifest.get('abi')}, this Python is {abi_tag()}"
    if manifest.get("kernel_sources") != kernel_sources_hash():
        return "stale: the Triton kernels changed after the set was made (python -m kda_compile.prebuild remakes it)"
    installation = triton_installation_hash()
    if installation is None or manifest.get("triton_installation") != installation:
        return "made with another build of this Triton version (its installation hash differs)"
    return None


def install_set(folder: Path, manifest: dict) -> int:
    """Copy the set's files into Triton's cache (only what is missing there); returns the files written."""
    from triton.runtime.cache import get_cache_manager

    written = 0
    for key_folder, names in manifest["entries"].items():
        manager = get_cache_manager(_decode_key(key_folder))
        for name in names:
            if not name.startswith(GROUP_PREFIX) and manager.get_file(name) is None:
                manager.put((folder / key_folder / name).read_bytes(), name, binary=True)
                written += 1
        for name in names:   # a group lists its files by absolute path: point it at this cache's copies
            if name.startswith(GROUP_PREFIX) and manager.get_group(name[len(GROUP_PREFIX):]) is None:
                group = json.loads((folder / key_folder / name).read_text())["child_paths"]
                # the IR text files were not shipped: the group names the binary and the metadata only
                paths = {child: manager.get_file(child) for child in group if child in names}
                if paths and all(paths.values()):
                    manager.put_group(name[len(GROUP_PREFIX):], paths)
                    written += 1
    return written


def install(device) -> str:
    """Install the artefact set matching ``device`` into Triton's cache, once per process; returns what happened
    (also kept for :func:`status`).  Never raises: a failure only means the kernels compile as usual.  Callers on
    a hot path test :data:`DONE` first."""
    global DONE
    key = str(device)
    if key not in _installed:
        _installed[key] = _install(device)
        DONE = DONE or getattr(device, "type", None) == "cuda"
    return _installed[key]


def _install(device) -> str:
    import torch
    if getattr(device, "type", str(device)) != "cuda" or os.environ.get("KDA_COMPILE_NO_PREBUILT"):
        return "not used (no CUDA device, or KDA_COMPILE_NO_PREBUILT set)"
    try:
        import triton
        capability = torch.cuda.get_device_capability(device)
        tag = tag_for(triton.__version__, capability)
        manifest = load_manifest(tag)
        if manifest is None:
            return f"none for {tag} (shipped: {', '.join(shipped_tags()) or 'none'})"
        reason = mismatch(manifest, triton.__version__, capability)
        if reason:
            return f"{tag} not installed: {reason}"
        written = install_set(ROOT / tag, manifest)
        return f"{tag}: {len(manifest['entries'])} cache entries, {written} files written"
    except Exception as exc:  # the artefacts are an optimisation; compiling stays the fallback
        print(f"kda_compile: prebuilt Triton kernels not installed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return f"failed: {type(exc).__name__}: {exc}"


def status() -> str:
    """What :func:`install` did in this process, or which sets are shipped when it has not run."""
    if _installed:
        return "; ".join(f"{device}: {result}" for device, result in _installed.items())
    return f"shipped sets: {', '.join(shipped_tags()) or 'none'} (installed on the first Triton call on a GPU)"


def collect(cache_dir: Path, out: Path, capability: tuple[int, int], problems: list[str]) -> dict:
    """Copy the binary part of every folder of a Triton cache that one process filled into the set ``out`` and write
    its manifest; returns the manifest."""
    import torch
    import triton
    entries = {}
    for entry in sorted(p for p in cache_dir.iterdir() if p.is_dir()):
        names = sorted(f.name for f in entry.iterdir() if f.is_file() and f.name.endswith(KEEP_SUFFIXES))
        if not names:
            continue
        (out / entry.name).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(entry / name, out / entry.name / name)
        entries[entry.name] = names
    manifest = {"made": f"{datetime.date.today()} on {torch.cuda.get_device_name()}" if torch.cuda.is_available()
                else str(datetime.date.today()),
                "triton": triton.__version__, "triton_installation": triton_installation_hash(),
                "capability": list(capability), "abi": abi_tag(), "kernel_sources": kernel_sources_hash(),
                "problems": problems, "entries": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
