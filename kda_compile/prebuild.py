"""``python -m kda_compile.prebuild``: compile the Triton kernels of the common first calls on this GPU and store
their binaries as a shipped artefact set (``kernels_triton/prebuilt/<tag>/``, see
:mod:`kda_compile.kernels_triton.prebuilt`), so that a fresh process on the same GPU architecture and Triton build
starts without waiting on Triton's compilers.

The calls (:data:`PROBLEMS`) run in a child process whose Triton cache is an empty temporary folder, through the
public API with the dispatch's own choices (the tuned table of this GPU), so the set holds exactly what those calls
compile.  Run it after the Triton kernels or the shipped table change; the package's tests say when the shipped set
no longer matches the kernel sources.

    python -m kda_compile.prebuild                       # every problem, into the package's folder
    python -m kda_compile.prebuild --only forward --output /tmp/set
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (name, group, what the call is): bf16, K = V = 128, the dispatch's tuned choice.  The forward at the standard
# shapes in the three usual settings (q/k normalised by the caller with the log gate; the L2 norm in the kernel
# with the log gate; the L2 norm and the safe gate in the kernel), with a final state as a prefill returns it; the
# training step of each setting; the decode step alone and on a state pool in place.
PROBLEMS = [
    (f"forward {setting} B{B}·T{T}·H{H}", "forward", ("chunk", setting, B, T, H))
    for setting in ("prenorm_log", "l2_log", "l2_safe") for B, T, H in ((2, 8192, 16), (1, 32768, 16), (8, 4096, 32))
] + [
    (f"training {setting} B2·T8192·H16", "training", ("train", setting, 2, 8192, 16))
    for setting in ("prenorm_log", "l2_log", "l2_safe")
] + [
    ("decode B1·H32", "decode", ("decode", "l2_log", 1, 1, 32)),
    ("decode B64·H32, state pool in place", "decode", ("decode_pool", "l2_log", 64, 1, 32)),
]
GROUPS = ("forward", "training", "decode")


def _inputs(setting: str, B: int, T: int, H: int, train: bool, device: str = "cuda"):
    """Random bf16 inputs of a setting (D = 128) and the keywords of the call."""
    import torch
    import torch.nn.functional as F
    gen = torch.Generator(device=device).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, device=device, generator=gen)
    x = dict(q=r(B, T, H, 128), k=r(B, T, H, 128), v=r(B, T, H, 128).bfloat16(),
             beta=torch.rand(B, T, H, device=device, generator=gen))
    kw = {}
    if setting == "prenorm_log":
        x["q"], x["k"] = F.normalize(x["q"], dim=-1), F.normalize(x["k"], dim=-1)
    else:
        kw["use_qk_l2norm_in_kernel"] = True
    x["q"], x["k"] = x["q"].bfloat16(), x["k"].bfloat16()
    if setting == "l2_safe":
        x["g"] = r(B, T, H, 128)
        x["A_log"] = torch.log(torch.rand(H, device=device, generator=gen) * 15 + 1)
        x["dt_bias"] = r(H * 128) * 0.1
        kw.update(use_gate_in_kernel=True, safe_gate=True, lower_bound=-5.0)
    else:
        x["g"] = F.logsigmoid(r(B, T, H, 128) + 3)
    if train:
        for t in x.values():
            t.requires_grad_(True)
    return x, kw


def run_problem(kind: str, setting: str, B: int, T: int, H: int) -> None:
    """One call of the problem (compiling whatever it needs), synchronised."""
    import torch

    import kda_compile
    if kind in ("chunk", "train"):
        x, kw = _inputs(setting, B, T, H, train=kind == "train")
        if kind == "chunk":
            with torch.inference_mode():
                kda_compile.chunk_kda(**x, output_final_state=True, **kw)
        else:
            o, _ = kda_compile.chunk_kda(**x, **kw)
            o.float().square().mean().backward()
    else:
        x, kw = _inputs(setting, B, T, H, train=False)
        state = torch.zeros(B * 2 if kind == "decode_pool" else B, H, 128, 128, device="cuda")
        extra = dict(initial_state=state, output_final_state=True)
        if kind == "decode_pool":
            extra = dict(initial_state=state, ssm_state_indices=torch.arange(B, device="cuda", dtype=torch.int32) * 2,
                         inplace_final_state=True)
        with torch.inference_mode():
            kda_compile.fused_recurrent_kda(**x, **extra, **kw)
    torch.cuda.synchronize()


def _worker(groups: list[str]) -> int:
    """The child: run the problems of ``groups`` (Triton's cache is the parent's temporary folder)."""
    for name, group, problem in PROBLEMS:
        if group in groups:
            t0 = time.perf_counter()
            run_problem(*problem)
            print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


def main(argv=None) -> int:
    from .kernels_triton import prebuilt

    p = argparse.ArgumentParser(prog="python -m kda_compile.prebuild", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(GROUPS), help=f"problem groups, any of {', '.join(GROUPS)} "
                   "(default all)")
    p.add_argument("--output", type=Path, default=None, help="the set's folder (default: the package's "
                   "kernels_triton/prebuilt/<tag>, replaced)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    if set(groups) - set(GROUPS):
        raise ValueError(f"--only takes {GROUPS}, got {args.only!r}")
    if args.worker:
        return _worker(groups)

    import torch
    import triton
    if not torch.cuda.is_available():
        print("prebuild needs a CUDA GPU: the artefacts are compiled for the GPU it runs on", file=sys.stderr)
        return 2
    capability = torch.cuda.get_device_capability()
    out = args.output or prebuilt.ROOT / prebuilt.tag_for(triton.__version__, capability)
    names = [name for name, group, _ in PROBLEMS if group in groups]
    print(f"prebuild: {len(names)} calls on {torch.cuda.get_device_name()} (sm_{capability[0]}{capability[1]}), "
          f"Triton {triton.__version__}, into {out}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kda-prebuild-") as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache, KDA_COMPILE_NO_PREBUILT="1")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kda_compile.prebuild", "--worker", "--only", ",".join(groups)],
                       env=env, check=True)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        manifest = prebuilt.collect(Path(cache), out, capability, names)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"prebuild: {len(manifest['entries'])} cache entries, {size / 2 ** 20:.1f} MiB, in "
          f"{time.perf_counter() - t0:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
