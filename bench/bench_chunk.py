"""Forward (prefill) benchmark: kda_compile backends vs FLA, cuDNN-frontend KDA and SDPA (causal).

    python bench/bench_chunk.py [--quick] [--stages [--config JSON]] [--out bench/results_tilelang.md]

Standard shapes (D=128, bf16, q/k L2-normalised in the kernel), two gate modes: log-space gate given, and the
safe gate (use_gate_in_kernel=True, safe_gate=True, lower_bound=-5).  Times are medians in ms.
"""
from __future__ import annotations

import json
import sys

import torch

from common import (GATES, LOWER_BOUND, STANDARD_SHAPES, dense_cu_seqlens, emit, fast_backends, fla_forward,
                    gate_kwargs, kda_options, make_inputs, parser, ratio, table, try_time, versions)


def ours(name, x, gate):
    import kda_compile

    kw = dict(use_qk_l2norm_in_kernel=True, **gate_kwargs(gate))
    return lambda: kda_compile.chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], A_log=x.get("A_log"),
                                         dt_bias=x.get("dt_bias"), backend=name, **kw)


def cudnn_kda(x, gate):
    from cudnn.linear_attention import kimi_delta_attention

    B, T, H, D = x["q"].shape
    q, k, v = (x[n].reshape(B * T, H, D) for n in ("q", "k", "v"))
    g, beta = x["g"].reshape(B * T, H, D), x["beta"].reshape(B * T, H)
    cu = dense_cu_seqlens(B, T)
    kw = dict(use_qk_l2norm_in_kernel=True)
    if gate != "log":
        kw.update(safe_gate=True, gate_lower_bound=LOWER_BOUND, a_log=x["A_log"], dt_bias=x["dt_bias"].view(H, D))
    return lambda: kimi_delta_attention(q, k, v, g, beta, cu, **kw)


def sdpa(x):
    q, k, v = (x[n].transpose(1, 2).contiguous() for n in ("q", "k", "v"))
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def stages(x, gate, config=None):
    """Times of the two TileLang stages alone (``config``: kernel config overrides, see chunk_fwd)."""
    from kda_compile.kernels_tl.chunk_fwd import plan

    opts = kda_options(x, gate)
    s1, s2, _ = plan(x["q"], x["k"], x["v"], x["g"], x["beta"], None, None, x.get("A_log"), x.get("dt_bias"),
                     opts, False, config)
    return try_time("stage1", s1), try_time("stage2", s2)


def main():
    p = parser(__doc__)
    p.add_argument("--stages", action="store_true", help="also time the TileLang stages separately")
    p.add_argument("--config", default="{}", help='TileLang kernel config for --stages, JSON, e.g. '
                   '\'{"intra_threads": 128, "block_V": 64}\'')
    args = p.parse_args()
    shapes = STANDARD_SHAPES[:1] if args.quick else STANDARD_SHAPES
    gates = GATES[:1] if args.quick else GATES
    backends = fast_backends()
    # time ratios (ours / peer; above 1 = slower than the peer): every backend against FLA, the first
    # (default-order) backend also against cuDNN and SDPA
    headers = ["B·T·H", "gate", *[f"{b} ms" for b in backends], "FLA ms", "cuDNN ms", "SDPA ms",
               *[f"{b}/FLA" for b in backends],
               *([f"{backends[0]}/cuDNN", f"{backends[0]}/SDPA"] if backends else [])]
    if args.stages:
        headers += ["stage1 ms", "stage2 ms"]
    rows = []
    for B, T, H in shapes:
        sd = None
        for gate in gates:
            x = make_inputs(B, T, H, gate=gate)
            ours_t = [try_time(b, ours(b, x, gate)) for b in backends]
            fla_t = try_time("fla", fla_forward(x, gate))
            cud_t = try_time("cudnn", cudnn_kda(x, gate))
            if sd is None:
                sd = try_time("sdpa", sdpa(x))
            row = [f"{B}·{T}·{H}", gate, *ours_t, fla_t, cud_t, sd]
            row += [ratio(t, fla_t) for t in ours_t]
            if backends:
                row += [ratio(ours_t[0], cud_t), ratio(ours_t[0], sd)]
            if args.stages:
                row += list(stages(x, gate, json.loads(args.config)))
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
            del x
            torch.cuda.empty_cache()
    cmd = "python bench/bench_chunk.py " + " ".join(sys.argv[1:])
    emit(f"\n### Forward (chunk), D=128 bf16, median ms\n\n{versions()}\n\n`{cmd}`\n\n{table(headers, rows)}\n",
         args.out)


if __name__ == "__main__":
    main()
