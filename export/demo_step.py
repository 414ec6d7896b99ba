"""The demo's export-and-run step: export the tiny hybrid model, run it in onnxruntime, compare with PyTorch.

``python -m kda_compile demo`` calls :func:`run_demo` (wired in by kda_compile/__main__.py)."""
from __future__ import annotations

import time

import torch


def run_demo(out_dir: str, batch: int = 2, length: int = 64, decode_steps: int = 16, seed: int = 0) -> dict:
    """Export ``HybridConfig.tiny()`` (random weights) to ``out_dir``, run a prefill of ``length`` tokens and
    ``decode_steps`` decode steps in onnxruntime and in PyTorch; prints a few lines and returns
    ``{"ok", "prefill_err", "decode_err", "export_s", "prefill_ms_ort", "prefill_ms_torch", "kda_nodes",
    "prefill", "decode"}`` (errors: max relative, limit 1e-4)."""
    import onnx

    from kda_compile.model import HybridConfig, HybridModel

    from . import schema
    from .exporter import export_hybrid
    from .parity import compare
    from .runner import OnnxHybridRunner

    torch.manual_seed(seed)
    model = HybridModel(HybridConfig.tiny()).eval()
    start = time.perf_counter()
    paths = export_hybrid(model, out_dir)
    export_s = time.perf_counter() - start
    graph = onnx.load(paths.prefill).graph
    kda_nodes = sum(n.domain == schema.DOMAIN for n in graph.node)
    print(f"ONNX export: {paths.prefill}, {paths.decode} ({export_s:.1f} s; {kda_nodes} {schema.DOMAIN}::"
          f"{schema.OP_TYPE} nodes, one per KDA layer)")

    runner = OnnxHybridRunner(out_dir)
    errors = compare(model, runner, batch, length, decode_steps, seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    times = {}
    for name, fn in (("ort", lambda: runner.prefill(ids.numpy())),
                     ("torch", lambda: model.forward_cached(ids, None))):
        best = float("inf")
        with torch.no_grad():
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
        times[name] = best * 1e3
    ok = max(errors.values()) <= 1e-4
    print(f"onnxruntime vs PyTorch (B={batch}, T={length}, then {decode_steps} decode steps): max relative error "
          f"prefill {errors['prefill']:.1e}, decode {errors['decode']:.1e} -> {'OK' if ok else 'FAILED'}; "
          f"prefill {times['ort']:.1f} ms (onnxruntime) vs {times['torch']:.1f} ms (PyTorch)")
    return {"ok": ok, "prefill_err": errors["prefill"], "decode_err": errors["decode"], "export_s": export_s,
            "prefill_ms_ort": times["ort"], "prefill_ms_torch": times["torch"], "kda_nodes": kda_nodes,
            "prefill": paths.prefill, "decode": paths.decode}
