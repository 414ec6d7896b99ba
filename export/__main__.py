"""``python -m kda_compile.export --out DIR``: export the hybrid model to DIR/prefill.onnx and DIR/decode.onnx.

Without ``--checkpoint`` the model is ``HybridConfig.tiny()`` with random weights (``--seed``); a checkpoint is a
Kimi Linear checkpoint folder (config.json + safetensors) or a ``.safetensors`` file of ``HybridModel.save``.  After
exporting, a short parity check runs the graphs in onnxruntime against PyTorch (skip with ``--no-check``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kda_compile.export",
        description="Export the KDA/MLA hybrid model to ONNX (prefill.onnx + decode.onnx), every KDA call one "
                    "kda_compile::KDA node with a model-local function body that onnxruntime runs.")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--checkpoint", default=None,
                        help="a Kimi Linear checkpoint folder, or a .safetensors file written by HybridModel.save "
                             "(default: HybridConfig.tiny(), random)")
    parser.add_argument("--body", choices=("loop", "linear_attention"), default=None,
                        help="function body of the KDA op: opset-27 LinearAttention (default when onnxruntime >= 1.32) "
                             "or the chunkwise Loop (default otherwise)")
    parser.add_argument("--moe-impl", choices=("dense", "gather"), default="dense",
                        help="ONNX form of the routed experts (MoE checkpoints): dense (default) or gather")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch parity check")
    args = parser.parse_args(argv)

    import torch

    from kda_compile.model import HybridConfig, HybridModel

    from .exporter import export_hybrid
    from .parity import compare
    from .runner import OnnxHybridRunner

    if args.checkpoint and os.path.isdir(args.checkpoint):
        model = HybridModel.from_pretrained(args.checkpoint, dtype=torch.float32)
        what = args.checkpoint
    elif args.checkpoint:
        model = HybridModel.load(args.checkpoint, dtype=torch.float32)
        what = args.checkpoint
    else:
        torch.manual_seed(args.seed)
        model = HybridModel(HybridConfig.tiny())
        what = "HybridConfig.tiny() with random weights"
    model.eval()
    start = time.perf_counter()
    result = export_hybrid(model, args.out, body=args.body, moe_impl=args.moe_impl)
    print(f"exported {what} ({result.body} body) in {time.perf_counter() - start:.1f} s:")
    print(f"  {result.prefill}\n  {result.decode}")
    if args.no_check:
        return 0
    errors = compare(model, OnnxHybridRunner(args.out), batch=2, length=33, decode_steps=4)
    ok = max(errors.values()) <= 1e-4
    print(f"onnxruntime vs PyTorch, max relative error: prefill {errors['prefill']:.2e}, "
          f"decode {errors['decode']:.2e} -> {'OK' if ok else 'FAILED'} (limit 1e-4)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
