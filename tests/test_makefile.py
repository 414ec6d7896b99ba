"""`make setup` keeps a torch already in the venv (a CUDA build installed first) and pins one otherwise."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def setup_recipe(tmp_path, *variables):
    """The commands `make setup` would run for a fresh venv under tmp_path (dry run: nothing is executed)."""
    venv = tmp_path / "venv"
    out = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), "setup", f"VENV={venv}", *variables],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "import torch" in line or "torch==" in line]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_torch_pin_only_when_torch_is_missing(tmp_path):
    lines = setup_recipe(tmp_path)
    assert len(lines) == 1, lines
    guard, install = lines[0].split("||")
    assert '-c "import torch"' in guard             # an installed torch (e.g. a CUDA build) is kept
    assert 'pip install -q "torch==2.13.0"' in install


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_torch_pin_is_a_variable(tmp_path):
    (line,) = setup_recipe(tmp_path, "TORCH=torch==2.9.1")
    assert 'pip install -q "torch==2.9.1"' in line.split("||")[1]
