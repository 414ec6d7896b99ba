"""Run the Triton chunkwise forward a few times at one shape, for a profiler to attach to.

    ncu --clock-control none --kernel-name "regex:_chunk_|_split_" --launch-skip 5 --launch-count 5 \\
        python bench/profile_forward.py [--shape 2,8192,16] [--config '{"intra_impl": "rows"}'] [--calls 3]

The first call compiles (and its launches are the ones ``--launch-skip`` skips); nothing is timed here:
bench/bench_chunk.py and bench/device_triton.py are the benchmarks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make_inputs  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="2,8192,16", help="B,T,H (D = 128, bf16, log gate); default 2,8192,16")
    p.add_argument("--config", default="{}", help="Triton backend config, JSON (default: the shipped defaults)")
    p.add_argument("--calls", type=int, default=3, help="forward calls (default 3: the first compiles)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    from kda_compile.api import _options
    from kda_compile.kernels_triton.chunk_fwd import chunk_kda_fwd
    B, T, H = (int(s) for s in a.shape.split(","))
    x = make_inputs(B, T, H)
    opts = _options(x["q"], None, True, False, False, False, None, 64, False)
    config = json.loads(a.config)
    for i in range(a.calls):
        chunk_kda_fwd(x["q"], x["k"], x["v"], x["g"], x["beta"], None, None, None, None, opts, False, config)
        torch.cuda.synchronize()
        print(f"call {i + 1}/{a.calls} done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
