"""Decode benchmark: one token per sequence, state in/out, kda_compile backends vs FLA and cuDNN-frontend.

    python bench/bench_decode.py [--config JSON] [--out bench/results_tilelang.md]

B in {1, 64}, H = 32, D = 128, bf16, float32 state.  Times are medians (CUDA-graph replay, so host overhead
is excluded for every provider alike).  "state GB/s" is 2 x state bytes / time (read + write) and is
compared with a device-to-device copy of the same number of bytes.
"""
from __future__ import annotations

import json
import sys

import torch

from common import dense_cu_seqlens, emit, fast_backends, make_inputs, parser, ratio, table, try_time, versions

D = 128


def decode_inputs(B, H):
    x = make_inputs(B, 1, H, D)
    x["h0"] = torch.randn(B, H, D, D, device="cuda") * 0.1
    return x


def ours(name, x, config=None):
    import kda_compile

    if config and name == "tilelang":  # a kernel config of the TileLang decode kernel, bypassing dispatch
        from kda_compile.kernels_tl.fused_recurrent import fused_recurrent_fwd
        from kda_compile.reference import KDAOptions

        opts = KDAOptions(scale=D ** -0.5, use_qk_l2norm_in_kernel=True)
        return lambda: fused_recurrent_fwd(x["q"], x["k"], x["v"], x["g"], x["beta"], x["h0"], None, None, None,
                                           opts, True, config=config)
    return lambda: kda_compile.fused_recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
                                                   output_final_state=True, use_qk_l2norm_in_kernel=True,
                                                   backend=name)


def fla(x):
    from fla.ops.kda import fused_recurrent_kda

    return lambda: fused_recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
                                       output_final_state=True, use_qk_l2norm_in_kernel=True)


def cudnn_kda(x):
    from cudnn.linear_attention import kimi_delta_attention

    B, T, H, _ = x["q"].shape
    q, k, v = (x[n].reshape(B * T, H, D) for n in ("q", "k", "v"))
    g, beta = x["g"].reshape(B * T, H, D), x["beta"].reshape(B * T, H)
    h0 = x["h0"].transpose(-1, -2).contiguous()  # cuDNN keeps the state [N, H, V, K]
    cu = dense_cu_seqlens(B, T)
    return lambda: kimi_delta_attention(q, k, v, g, beta, cu, initial_state=h0, output_final_state=True,
                                        use_qk_l2norm_in_kernel=True)


def main():
    p = parser(__doc__)
    p.add_argument("--config", default="{}", help='TileLang decode kernel config, JSON, e.g. '
                   '\'{"layout": "column", "block_V": 128, "threads": 128}\'')
    args = p.parse_args()
    config = json.loads(args.config)
    backends = fast_backends()
    headers = ["B·H", *[f"{b} µs" for b in backends], "FLA µs", "cuDNN µs", "copy µs",
               *([f"{backends[0]} state GB/s", "copy GB/s", f"{backends[0]}/copy BW", f"{backends[0]}/FLA"]
                 if backends else [])]
    rows = []
    for B in (1, 64):
        H = 32
        x = decode_inputs(B, H)
        state_bytes = x["h0"].numel() * 4
        graph = True
        ours_t = [try_time(b, ours(b, x, config), graph) for b in backends]
        fla_t = try_time("fla", fla(x), graph)
        cud_t = try_time("cudnn", cudnn_kda(x), graph)
        dst = torch.empty_like(x["h0"])
        copy_t = try_time("copy", lambda: dst.copy_(x["h0"]), graph)
        us = [None if t is None else t * 1e3 for t in (*ours_t, fla_t, cud_t, copy_t)]
        row = [f"{B}·{H}", *us]
        if backends:
            bw = lambda t: None if t is None else 2 * state_bytes / (t * 1e-3) / 1e9  # noqa: E731
            row += [bw(ours_t[0]), bw(copy_t), ratio(bw(ours_t[0]), bw(copy_t)), ratio(ours_t[0], fla_t)]
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    cmd = "python bench/bench_decode.py " + " ".join(sys.argv[1:])
    emit(f"\n### Decode (1 token/sequence), H=32, D=128, bf16, fp32 state, median µs (CUDA graphs)\n\n"
         f"{versions()}\n\n`{cmd}`\n\n{table(headers, rows)}\n", args.out)


if __name__ == "__main__":
    main()
