"""Command line: ``python -m kda_compile demo`` (end-to-end check) and ``python -m kda_compile info``."""
from __future__ import annotations

import argparse
import sys


def _standard_call(op: str, device: str):
    """A small call of the usual kind (bfloat16, K = V = 128, with initial and final state) on ``device``:
    what ``info`` asks each backend about."""
    from .autotune import make_call
    from .buckets import Bucket
    bucket = Bucket(op, "bf16", 128, 128, "T1k" if op == "chunk" else "t1", "dense")
    return make_call(bucket, N=1, T=64 if op == "chunk" else 1, H=2, HV=2, device=device, seed=0)


def backend_status(device: str) -> dict[str, dict[str, str | None]]:
    """For every known backend: op -> None when it can run a standard call on ``device``, else the reason.
    Backends that failed to register have the import failure as the reason for every op."""
    from . import dispatch
    names = dispatch.backends()
    calls = {op: _standard_call(op, device) for op in dispatch.OPS}
    status = {}
    for name in names:
        backend = dispatch.get_backend(name)
        status[name] = {}
        for op, call in calls.items():
            why_not = backend.supports(call)
            if why_not is not None and "backend=" not in why_not and backend.supports_forced is not None \
                    and backend.supports_forced(call) is None:
                why_not += f" (runs when asked for with backend={name!r})"
            status[name][op] = why_not
    for name, why in dispatch._UNAVAILABLE.items():
        status.setdefault(name, {op: f"unavailable: {why}" for op in dispatch.OPS})
    return status


def _info(args) -> int:
    import torch

    from . import __version__, dispatch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"kda_compile {__version__}, torch {torch.__version__}, "
          f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    print("registered backends (default order): " + ", ".join(dispatch.backends()))
    print(f"can each run a standard call here ({device}, bfloat16, K = V = 128, with state)?")
    for name, ops in backend_status(device).items():
        for op, why_not in ops.items():
            print(f"  {name:<10} {op:<10} " + ("yes" if why_not is None else f"no: {why_not}"))
    try:
        from .kernels_triton import prebuilt
    except ImportError:
        return 0
    if device == "cuda":
        prebuilt.install(torch.device("cuda"))
    print(f"prebuilt Triton kernels: {prebuilt.status()}")
    return 0


def _demo(args) -> int:
    import torch

    from .demo import run_kda_step
    from .demo_model import run_demo as run_model_step
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = [run_kda_step(T=args.tokens, device=device, seed=args.seed)]
    print()
    results.append(run_model_step(seed=args.seed, device=device, compile=not args.no_compile))
    if not args.no_export:
        import os
        import tempfile

        from .export.demo_step import run_demo as run_export_step
        print()
        with tempfile.TemporaryDirectory(prefix="kda_compile_demo_") as folder:
            results.append(run_export_step(os.path.join(folder, "onnx")))
    ok = all(r["ok"] for r in results)
    print(f"\ndemo {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kda_compile",
                                     description="Kimi Delta Attention, compiled: demo and environment info.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run KDA through the public API and check it against the float64 "
                                       "recurrence (CPU is fine)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--tokens", type=int, default=1000, help="sequence length of the prefill (default 1000)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--no-compile", action="store_true", help="skip the torch.compile part of the model step")
    demo.add_argument("--no-export", action="store_true", help="skip the ONNX export-and-run step")
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="show versions and which backends can run here, and why not")
    info.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
