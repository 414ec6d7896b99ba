"""Every Triton kernel launch of the common calls compiles for sm_90 with Triton's own compiler, on the CPU.

The interpreter that runs our kernels in the CPU tests does not type-check them the way the compiler does (a
loop-carried variable that changes shape passes there and fails on the GPU), so this test records the launches of
a forward, three training steps and a decode step under the interpreter and compiles each one for the GPU target.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ptxas_available() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="needs Triton with its bundled ptxas (the NVIDIA backend)")
def test_every_recorded_triton_launch_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "tests/triton_launches.py", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert results, f"no launch was recorded:\n{out.stderr[-4000:]}"
    kernels = {r["launch"].split()[0] for r in results}
    # the stages of the forward, the backward and the decode all took part
    assert {"kda_intra_kernel", "kda_solve_kernel", "kda_state_kernel", "kda_output_kernel", "kda_bwd_intra_kernel",
            "kda_bwd_solve_kernel", "kda_bwd_state_kernel", "kda_decode_kernel"} <= kernels, kernels
    failures = [f"{r['launch']}: {r['error'][-600:]}" for r in results if not r["ok"]]
    assert not failures, "\n\n".join(failures)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.mark.skipif(not _ptxas_available(), reason="needs Triton with its bundled ptxas (the NVIDIA backend)")
def test_sass_counts_attribute_every_instruction_to_a_source_line():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "tests/triton_launches.py", "--sass", "kda_decode_kernel", "--min-count",
                          "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    heads = [line for line in out.stdout.splitlines() if not line.startswith("  ")]
    assert heads and all(" instructions, " in line for line in heads), out.stdout[-2000:]
    total = int(re.search(r"(\d+) instructions, ", heads[0]).group(1))
    first = out.stdout.split(heads[1])[0] if len(heads) > 1 else out.stdout
    counts = [line.split() for line in first.splitlines() if line.startswith("  ")]
    assert sum(int(count) for _, count in counts) == total > 0
    # most of the decode kernel's instructions belong to its own module's lines
    own = sum(int(count) for where, count in counts if where.startswith("fused_recurrent.py:"))
    assert own > total / 2, counts
