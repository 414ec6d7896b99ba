"""Command line: ``python -m kda_compile demo`` (end-to-end check) and ``python -m kda_compile info``."""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    import torch

    from . import __version__, dispatch
    print(f"kda_compile {__version__}, torch {torch.__version__}, "
          f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    print("registered backends (default order): " + ", ".join(dispatch.backends()))
    for name, why in dispatch._UNAVAILABLE.items():
        print(f"  {name}: unavailable ({why})")
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
    info = sub.add_parser("info", help="show versions and which backends can run here")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
