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
the GPU's compute capability and the Python ABI.  The manifest also holds a hash per kernel of its sources (the
kernel, the JIT functions it calls and the module constants they read, :func:`kernel_hashes`): the artefacts of a
kernel edited since are never hit, so they are left out and :func:`status` names them, while the unchanged
kernels still install.  Anything the set does not cover compiles on first
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


def _kernel_module_texts(folder: Path) -> dict[str, str]:
    """File name -> text of this package's modules that define Triton kernels."""
    texts = {path.name: path.read_text() for path in sorted(folder.glob("*.py"))}
    return {name: text for name, text in texts.items() if re.search(r"^@triton\.jit", text, re.MULTILINE)}


def module_hashes(folder: Path | None = None) -> dict[str, str]:
    """sha256 per kernel module's whole text: when all of them are as the set was made, no kernel can be stale, and
    :func:`stale_kernels` skips parsing them (a few ms instead of about 0.1 s on the first Triton call)."""
    return {name: hashlib.sha256(text.encode()).hexdigest()
            for name, text in _kernel_module_texts(folder or Path(__file__).parent).items()}


def _module_index(folder: Path) -> dict[str, dict]:
    """Per module that defines Triton kernels (by file stem): its top-level ``@triton.jit`` functions (start line,
    the decorators included, and text), its top-level assignments (constants a kernel may read) and the names it
    imports from sibling modules."""
    index = {}
    for file_name, text in _kernel_module_texts(folder).items():
        lines = text.splitlines()
        jit, consts, imports = {}, {}, {}
        for node in ast.parse(text).body:
            decorators = [ast.get_source_segment(text, d).split("(")[0] for d in getattr(node, "decorator_list", [])]
            if isinstance(node, ast.FunctionDef) and {"triton.jit", "jit"} & set(decorators):
                start = node.decorator_list[0].lineno   # the line Triton's key holds
                jit[node.name] = (start, "\n".join(lines[start - 1:node.end_lineno]), node)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            consts[name.id] = "\n".join(lines[node.lineno - 1:node.end_lineno])
            elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                for alias in node.names:
                    imports[alias.asname or alias.name] = (node.module, alias.name)
        index[file_name.removesuffix(".py")] = {"jit": jit, "consts": consts, "imports": imports}
    return index


def kernel_hashes(folder: Path | None = None) -> dict[str, str]:
    """sha256 per top-level ``@triton.jit`` function of this package's kernel modules, over what Triton's key for
    it can depend on: its text and start line, and those of every JIT function it calls (in its module or imported
    from a sibling), and the text of every module constant those functions name.  Host code, docstrings, comments
    and other kernels leave a kernel's hash unchanged as long as it does not move to another line, so such edits
    leave its shipped artefacts valid."""
    index = _module_index(folder or Path(__file__).parent)

    def resolve(module: str, name: str):
        info = index[module]
        if name in info["jit"] or name in info["consts"]:
            return module, name
        if name in info["imports"] and info["imports"][name][0] in index:
            return resolve(*info["imports"][name])
        return None

    hashes = {}
    for module, info in index.items():
        for kernel in info["jit"]:
            seen, todo, parts = set(), [(module, kernel)], []
            while todo:
                key = todo.pop()
                if key in seen:
                    continue
                seen.add(key)
                mod, name = key
                if name in index[mod]["consts"]:
                    parts.append(f"{mod}.{name}={index[mod]['consts'][name]}")
                    continue
                start, text, node = index[mod]["jit"][name]
                parts.append(f"{mod}.{name}@{start}:{text}")
                todo += [hit for n in ast.walk(node) if isinstance(n, ast.Name)
                         for hit in [resolve(mod, n.id)] if hit is not None]
            hashes[kernel] = hashlib.sha256("\0".join(sorted(parts)).encode()).hexdigest()
    return hashes


def entry_kernel(names: list[str]) -> str | None:
    """The kernel a Triton cache entry (its file names) was compiled for; None for a launcher-only entry."""
    stems = {n[:-len(".json")] for n in names if n.endswith(".json") and not n.startswith(GROUP_PREFIX)}
    return next(iter(stems), None)


def stale_kernels(manifest: dict) -> list[str]:
    """The set's kernels whose sources changed after it was made (their artefacts would never be hit)."""
    if manifest.get("modules") and manifest["modules"] == module_hashes():
        return []   # not one kernel module changed
    current = kernel_hashes()
    return sorted(name for name, digest in manifest.get("kernels", {}).items() if current.get(name) != digest)


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
    if "kernels" not in manifest:
        return "made by an older kda_compile without per-kernel hashes (python -m kda_compile.prebuild remakes it)"
    installation = triton_installation_hash()
    if installation is None or manifest.get("triton_installation") != installation:
        return "made with another build of this Triton version (its installation hash differs)"
    return None


def install_set(folder: Path, manifest: dict, skip: frozenset[str] | set[str] = frozenset()) -> int:
    """Copy the set's files into Triton's cache (only what is missing there), except the entries of the kernels in
    ``skip``; returns the files written."""
    from triton.runtime.cache import get_cache_manager

    written = 0
    for key_folder, names in manifest["entries"].items():
        if entry_kernel(names) in skip:
            continue
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
        stale = stale_kernels(manifest)
        written = install_set(ROOT / tag, manifest, set(stale))
        note = f"; stale, compiled on first use: {', '.join(stale)}" if stale else ""
        return f"{tag}: {len(manifest['entries'])} cache entries, {written} files written{note}"
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
    collected = {entry_kernel(names) for names in entries.values()}
    manifest = {"made": f"{datetime.date.today()} on {torch.cuda.get_device_name()}" if torch.cuda.is_available()
                else str(datetime.date.today()),
                "triton": triton.__version__, "triton_installation": triton_installation_hash(),
                "capability": list(capability), "abi": abi_tag(), "problems": problems,
                "kernels": {name: digest for name, digest in kernel_hashes().items() if name in collected},
                "modules": module_hashes(), "entries": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
