"""Run an exported hybrid model in onnxruntime, checking every input against the graph's declared shapes first.

    runner = OnnxHybridRunner("out/")                 # out/prefill.onnx + out/decode.onnx
    logits, cache = runner.prefill(input_ids)         # cache: list of arrays (present_* order)
    logits, cache = runner.decode(next_ids, cache)
    tokens = runner.generate(input_ids, max_new_tokens=16)

A wrong input raises ValueError/TypeError naming it and the expected shape, instead of an onnxruntime error
from deep inside the graph.
"""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _as_array(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    return x


class OnnxHybridRunner:
    """onnxruntime sessions for ``prefill.onnx`` and ``decode.onnx`` of :func:`~kda_compile.export.export_hybrid`.

    ``path`` is the export folder; ``providers`` defaults to the CPU provider; ``threads`` sets onnxruntime's
    intra-op thread count (None: its default); ``spinning=False`` stops idle worker threads from busy-waiting
    (fairer when PyTorch runs in the same process, e.g. in benchmarks)."""

    def __init__(self, path: str, providers=None, threads: int | None = None, spinning: bool = True):
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = providers or ["CPUExecutionProvider"]
        self.sessions = {}
        for kind in ("prefill", "decode"):
            file = os.path.join(path, f"{kind}.onnx")
            if not os.path.exists(file):
                raise FileNotFoundError(f"{file} not found: export with `python -m kda_compile.export --out {path}`")
            self.sessions[kind] = ort.InferenceSession(file, options, providers=providers)
        inputs = self.sessions["prefill"].get_inputs()
        self.input_names = [i.name for i in inputs]
        self.cache_names = self.input_names[1:]
        self.declared = {i.name: (list(i.shape), i.type) for i in inputs}
        self.vocab_size = self.sessions["prefill"].get_outputs()[0].shape[-1]

    # ----------------------------------------------------------------------------------- checking
    def empty_cache(self, batch_size: int) -> list:
        """The cache of no tokens: zeros, with every ``past`` axis of length 0."""
        cache = []
        for name in self.cache_names:
            shape, kind = self.declared[name]
            dims = [batch_size if d == "batch" else 0 if isinstance(d, str) else d for d in shape]
            cache.append(np.zeros(dims, dtype=_NUMPY[kind]))
        return cache

    def check_inputs(self, kind: str, input_ids, cache) -> dict:
        """Validate ``input_ids`` and ``cache`` for the ``kind`` graph; returns the onnxruntime feed."""
        ids = _as_array(input_ids, "input_ids")
        if ids.dtype not in (np.int64, np.int32):
            raise TypeError(f"input_ids must hold int64 token ids of shape [batch, seq], got dtype {ids.dtype}")
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"input_ids must have shape [batch, seq] with seq >= 1, got {list(ids.shape)}")
        if kind == "decode" and ids.shape[1] != 1:
            raise ValueError(f"input_ids of a decode step must have shape [batch, 1], got {list(ids.shape)}; "
                             "use prefill for several tokens")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        cache = self.empty_cache(ids.shape[0]) if cache is None else list(cache)
        if len(cache) != len(self.cache_names):
            raise ValueError(f"cache must hold {len(self.cache_names)} tensors ({', '.join(self.cache_names)}), "
                             f"got {len(cache)}")
        feed, sizes = {"input_ids": ids.astype(np.int64)}, {"batch": ids.shape[0]}
        for name, value in zip(self.cache_names, cache):
            feed[name] = self._check_one(name, _as_array(value, name), sizes)
        return feed

    def _check_one(self, name: str, x: np.ndarray, sizes: dict) -> np.ndarray:
        shape, kind = self.declared[name]
        want = " x ".join(str(d) for d in shape)
        if x.ndim != len(shape):
            raise ValueError(f"{name} must have rank {len(shape)} (shape [{want}]), got shape {list(x.shape)}")
        for axis, (d, n) in enumerate(zip(shape, x.shape)):
            if isinstance(d, str):      # symbolic axis: the same size wherever it appears
                if sizes.setdefault(d, n) != n:
                    raise ValueError(f"{name} axis {axis} ({d}) has size {n}, but {d} = {sizes[d]} elsewhere "
                                     f"(input_ids or an earlier cache tensor); expected [{want}]")
            elif d != n:
                raise ValueError(f"{name} must have shape [{want}], got {list(x.shape)} (axis {axis})")
        if x.dtype != _NUMPY[kind]:
            raise TypeError(f"{name} must have dtype {np.dtype(_NUMPY[kind]).name}, got {x.dtype}")
        return np.ascontiguousarray(x)

    # ------------------------------------------------------------------------------------- running
    def run(self, kind: str, input_ids, cache=None):
        """Run ``kind`` ("prefill" or "decode"); returns ``(logits, new cache list)``."""
        if kind not in self.sessions:
            raise ValueError(f"kind must be 'prefill' or 'decode', got {kind!r}")
        outputs = self.sessions[kind].run(None, self.check_inputs(kind, input_ids, cache))
        return outputs[0], outputs[1:]

    def prefill(self, input_ids, cache=None):
        """Prompt tokens ``[batch, seq]`` (+ optional cache of earlier tokens) -> ``(logits, cache)``."""
        return self.run("prefill", input_ids, cache)

    def decode(self, input_ids, cache):
        """One token per sequence ``[batch, 1]`` + cache -> ``(logits [batch, 1, vocab], cache)``."""
        if cache is None:
            raise ValueError("decode needs the cache returned by prefill (or a previous decode)")
        return self.run("decode", input_ids, cache)

    def generate(self, input_ids, max_new_tokens: int) -> np.ndarray:
        """Greedy continuation ``[batch, seq + max_new_tokens]`` (prefill once, then one decode per token)."""
        ids = _as_array(input_ids, "input_ids").astype(np.int64)
        logits, cache = self.prefill(ids)
        out = [ids]
        for step in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            out.append(nxt)
            if step + 1 < max_new_tokens:
                logits, cache = self.decode(nxt, cache)
        return np.concatenate(out, axis=1)
