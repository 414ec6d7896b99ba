"""The shipped compiled Triton kernels (kernels_triton/prebuilt.py): a set collected from one Triton cache lands in
another through Triton's cache-manager API, where Triton's own lookup finds it; a set is installed only where
everything its keys depend on matches; the shipped sets match the current kernel sources; and on a GPU with a
matching set, a fresh process runs its first forward without compiling any of our kernels."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.cache import get_cache_manager  # noqa: E402

from kda_compile.kernels_triton import prebuilt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _folder(hex_key: str) -> str:
    return base64.b32encode(bytes.fromhex(hex_key)).decode().rstrip("=")


def _fake_cache(root: Path) -> tuple[str, str]:
    """A Triton cache as one process leaves it: a kernel entry (binary, metadata, IR text, group file naming them
    by absolute path) and a launcher entry.  Returns the two hex keys."""
    kernel, launcher = hashlib.sha256(b"kernel").hexdigest(), hashlib.sha256(b"launcher").hexdigest()
    k = root / _folder(kernel)
    k.mkdir(parents=True)
    (k / "kda_x_kernel.cubin").write_bytes(b"\x7fELF cubin bytes")
    (k / "kda_x_kernel.json").write_text('{"name": "kda_x_kernel"}')
    (k / "kda_x_kernel.ptx").write_text("// ptx text")
    (k / "__grp__kda_x_kernel.json").write_text(json.dumps({"child_paths": {
        n: str(k / n) for n in ("kda_x_kernel.cubin", "kda_x_kernel.json", "kda_x_kernel.ptx")}}))
    lf = root / _folder(launcher)
    lf.mkdir()
    (lf / f"__triton_launcher{prebuilt.abi_tag()}").write_bytes(b"\x7fELF launcher")
    return kernel, launcher


def test_a_collected_set_installs_where_tritons_lookup_finds_it(tmp_path, monkeypatch):
    source, target = tmp_path / "filled", tmp_path / "fresh"
    kernel, launcher = _fake_cache(source)
    out = tmp_path / "set"
    manifest = prebuilt.collect(source, out, (9, 0), ["a problem"])
    assert sorted(manifest["entries"][_folder(kernel)]) == ["__grp__kda_x_kernel.json", "kda_x_kernel.cubin",
                                                            "kda_x_kernel.json"]   # no IR text shipped
    assert json.loads((out / "manifest.json").read_text()) == manifest

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "skipping"))
    assert prebuilt.install_set(out, manifest, {"kda_x_kernel"}) == 1   # a stale kernel's entry: only the launcher
    monkeypatch.setenv("TRITON_CACHE_DIR", str(target))
    assert prebuilt.install_set(out, manifest) == 4   # cubin, metadata, group, launcher
    group = get_cache_manager(kernel).get_group("kda_x_kernel.json")
    assert group is not None and set(group) == {"kda_x_kernel.cubin", "kda_x_kernel.json"}
    assert all(Path(p).parent.parent == target for p in group.values())   # this cache's copies, not the source's
    assert Path(group["kda_x_kernel.cubin"]).read_bytes() == b"\x7fELF cubin bytes"
    assert get_cache_manager(launcher).get_file(f"__triton_launcher{prebuilt.abi_tag()}") is not None
    assert prebuilt.install_set(out, manifest) == 0   # what is there is left alone


def _manifest(**over):
    m = {"triton": triton.__version__, "capability": [9, 0], "abi": prebuilt.abi_tag(),
         "kernels": {}, "triton_installation": prebuilt.triton_installation_hash()}
    return {k: v for k, v in {**m, **over}.items() if v is not None}


@pytest.mark.parametrize("field, value, words", [
    ("triton", "0.0.1", "Triton 0.0.1"),
    ("capability", [8, 0], "compute capability"),
    ("abi", ".cpython-27.so", "launchers built for"),
    ("kernels", None, "older kda_compile"),
    ("triton_installation", "0" * 64, "another build"),
])
def test_a_set_is_installed_only_where_its_keys_can_match(field, value, words):
    assert prebuilt.mismatch(_manifest(), triton.__version__, (9, 0)) is None
    reason = prebuilt.mismatch(_manifest(**{field: value}), triton.__version__, (9, 0))
    assert reason is not None and words in reason


def test_no_gpu_means_nothing_installed():
    assert "not used" in prebuilt._install(torch.device("cpu"))


KERNEL_MODULE = '''"""A module with two kernels."""
import triton
import triton.language as tl

from .helpers import twice

BLOCK: tl.constexpr = 16
UNUSED = 3


def host_side(x):
    """Host code."""
    return x + 1


@triton.jit
def kda_x_kernel(x, BLOCK_N: tl.constexpr):
    # the kernel
    tl.store(x + tl.arange(0, BLOCK_N), twice(1.0) * BLOCK)


@triton.jit
def kda_y_kernel(y):
    tl.store(y, 2.0)
'''

HELPERS = '''import triton


@triton.jit
def twice(x):
    return 2 * x


@triton.jit
def unused_helper(x):
    return x
'''


@pytest.mark.parametrize("edit, stale", [
    (("Host code.", "Host code, reworded."), False),
    (('"""A module with two kernels."""', '"""The module\'s docstring, reworded."""'), False),
    (("return x + 1", "return x + 2"), False),
    (("UNUSED = 3", "UNUSED = 4"), False),                  # a constant no kernel reads
    (("tl.store(y, 2.0)", "tl.store(y, 3.0)"), False),       # another kernel of the module
    (("return x\n", "return x + 0\n"), False),               # a helper it does not call
    (("# the kernel", "# the kernel, commented otherwise"), True),   # Triton's key hashes the kernel's text
    (('"""Host code."""', '"""Host code,\n    on two lines."""'), True),   # and the line the kernel starts on
    (("1.0)", "3.0)"), True),
    (("BLOCK: tl.constexpr = 16", "BLOCK: tl.constexpr = 32"), True),   # a constant it reads
    (("return 2 * x", "return x + x"), True),               # a helper it calls, in another module
    (("@triton.jit\ndef kda_x", "@triton.jit(do_not_specialize=[\"x\"])\ndef kda_x"), True),
])
def test_a_kernel_goes_stale_only_with_what_its_compilation_reads(tmp_path, edit, stale):
    def write(edit=("", "")):
        for name, text in (("kernels.py", KERNEL_MODULE), ("helpers.py", HELPERS)):
            (tmp_path / name).write_text(text.replace(*edit) if edit[0] else text)
        (tmp_path / "host_only.py").write_text(f"X = {2 if edit[0] else 1}\n")   # no kernel in it: never counted
    write()
    before = prebuilt.kernel_hashes(tmp_path)
    write(edit)
    after = prebuilt.kernel_hashes(tmp_path)
    assert set(after) == {"kda_x_kernel", "kda_y_kernel", "twice", "unused_helper"}
    assert (after["kda_x_kernel"] != before["kda_x_kernel"]) == stale


def test_stale_kernels_are_found_by_their_hashes():
    names = {"AAAA": ["__grp__kda_x_kernel.json", "kda_x_kernel.cubin", "kda_x_kernel.json"],
             "BBBB": ["__triton_launcher.so"]}
    assert prebuilt.entry_kernel(names["AAAA"]) == "kda_x_kernel" and prebuilt.entry_kernel(names["BBBB"]) is None
    current = prebuilt.kernel_hashes()
    manifest = {"kernels": {"kda_intra_kernel": current["kda_intra_kernel"], "kda_state_kernel": "0" * 64}}
    assert prebuilt.stale_kernels(manifest) == ["kda_state_kernel"]
    # with every kernel module's text as the set was made, nothing is parsed and nothing can be stale
    assert prebuilt.stale_kernels({**manifest, "modules": prebuilt.module_hashes()}) == []
    assert prebuilt.stale_kernels({**manifest, "modules": {"gate.py": "0" * 64}}) == ["kda_state_kernel"]


# the kernels of the cold-start forward and of decode: a shipped set must have them current (a kernel edited
# without a GPU at hand may leave the backward's stale; they then compile on first use, and `info` names them)
FIRST_CALL_KERNELS = {"kda_gamma_kernel", "kda_intra_kernel", "kda_solve_kernel", "kda_state_kernel",
                      "kda_output_kernel", "kda_decode_kernel"}


@pytest.mark.parametrize("tag", prebuilt.shipped_tags())
def test_shipped_sets_hold_current_forward_and_decode_kernels(tag):
    """A shipped set's artefacts of a kernel edited since are never hit: remake it on that GPU with
    ``python -m kda_compile.prebuild``."""
    manifest = prebuilt.load_manifest(tag)
    assert manifest is not None, f"{tag}: no manifest.json"
    assert "kernels" in manifest, f"{tag} has no per-kernel hashes: remake it with `python -m kda_compile.prebuild`"
    assert FIRST_CALL_KERNELS <= set(manifest["kernels"]), sorted(manifest["kernels"])
    stale = set(prebuilt.stale_kernels(manifest)) & FIRST_CALL_KERNELS
    assert not stale, (f"the prebuilt set {tag} holds stale {sorted(stale)}; remake it with "
                       "`python -m kda_compile.prebuild` on an sm_{} GPU".format(tag.rsplit("sm", 1)[-1]))
    for folder, names in manifest["entries"].items():
        assert all((prebuilt.ROOT / tag / folder / n).is_file() for n in names), f"{tag}/{folder}: files missing"


CHILD = r"""
import torch, kda_compile
from kda_compile.kernels_triton import prebuilt
g = torch.Generator(device="cuda").manual_seed(0)
r = lambda *s: torch.randn(*s, device="cuda", generator=g)
q, k, v = (r(2, 8192, 16, 128).bfloat16() for _ in range(3))
gate = torch.nn.functional.logsigmoid(r(2, 8192, 16, 128) + 3)
beta = torch.rand(2, 8192, 16, device="cuda", generator=g)
kda_compile.chunk_kda(q, k, v, gate, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
torch.cuda.synchronize()
print("STATUS", prebuilt.status())
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_first_forward_of_a_fresh_process_compiles_none_of_our_kernels(tmp_path):
    """With empty user caches, the cold-start call (B2·T8192·H16, bf16, L2 norm in the kernel, log gate) finds all
    of its kernels in the shipped set: Triton writes IR text (``.ptx``) only when it compiles."""
    tag = prebuilt.tag_for(triton.__version__, torch.cuda.get_device_capability())
    manifest = prebuilt.load_manifest(tag)
    if manifest is None:
        pytest.skip(f"no prebuilt set for {tag} (shipped: {prebuilt.status()})")
    why = prebuilt.mismatch(manifest, triton.__version__, torch.cuda.get_device_capability())
    if why:
        pytest.skip(f"the shipped set {tag} cannot match here: {why}")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), KDA_COMPILE_CACHE_DIR=str(tmp_path / "kda"))
    env.pop("KDA_COMPILE_NO_PREBUILT", None)
    run = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600,
                         cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{tag}:" in run.stdout, run.stdout
    compiled = sorted(p.name for p in (tmp_path / "triton").rglob("kda_*.ptx"))
    assert not compiled, f"compiled on the first call despite the shipped set: {compiled}"
