"""The CUDA versions of the TileLang programs lower for sm_90a and compile with the local nvcc (nothing
runs), so CI without a GPU catches a program that no longer builds for Hopper."""
import shutil

import pytest

pytest.importorskip("tilelang")

from kda_compile.kernels_tl.chunk_fused import kda_fused  # noqa: E402
from kda_compile.kernels_tl.chunk_bwd_intra import kda_bwd_intra  # noqa: E402
from kda_compile.kernels_tl.chunk_bwd_prologue import kda_bwd_prologue  # noqa: E402
from kda_compile.kernels_tl.chunk_bwd_recompute import kda_bwd_states  # noqa: E402
from kda_compile.kernels_tl.chunk_bwd_solve import kda_bwd_solve  # noqa: E402
from kda_compile.kernels_tl.chunk_bwd_state import kda_bwd_state  # noqa: E402
from kda_compile.kernels_tl.chunk_intra import kda_intra  # noqa: E402
from kda_compile.kernels_tl.decode_slots import SlotMode  # noqa: E402
from kda_compile.kernels_tl.fused_recurrent import kda_decode, kda_decode_columns  # noqa: E402
from kda_compile.kernels_tl.gate import Prologue  # noqa: E402
from kda_compile.kernels_tl.segment_scan import kda_segment_fixup, kda_segment_scan  # noqa: E402
from kda_compile.kernels_tl.target import cuda_source, nvcc_compile  # noqa: E402

SAFE = Prologue(l2norm=True, gate=True, has_A_log=True, has_dt_bias=True, lower_bound=-5.0, beta_sigmoid=True)
PLAIN = Prologue(l2norm=True)
# speculative decoding in place: 2-D slot table, initial column from num_accepted_tokens, per-token stores, padding
SPECULATIVE = SlotMode(padding=True, columns=True, accepted=True, per_token=True)

PROGRAMS = {
    # name: (factory, args, kwargs, run nvcc too)
    # the fused forward: log gate (range check, element-wise diagonal tiles), bf16, K = 128 (wgmma products)
    "fused_bf16_log_k128": (kda_fused, (128, 128, 64),
                            dict(dtype="bfloat16", scale=128 ** -0.5, prologue=PLAIN, has_h0=True, block_V=64,
                                 threads=256), True),
    # safe gate (no check), fp16 (A products on float32 operands), state_v_first, chunk 32, the chunk states
    "fused_fp16_safe_vfirst_c32": (kda_fused, (64, 64, 32),
                                   dict(dtype="float16", prologue=SAFE, has_h0=True, state_v_first=True,
                                        store_states=True, block_V=32, threads=128), False),
    # float32 inputs at K = 128 run at chunk 32 (shared memory; chunk_fwd.kernel_tiles)
    "fused_fp32_k128_c32": (kda_fused, (128, 128, 32), dict(dtype="float32", prologue=PLAIN, block_V=64), False),
    "segment_scan_vfirst": (kda_segment_scan, (128, 128), dict(state_v_first=True, block_V=64), True),
    "segment_fixup_bf16": (kda_segment_fixup, (128, 128, 64), dict(dtype="bfloat16", block_V=64), True),
    "decode_tile_bf16_safe": (kda_decode, (128, 128),
                              dict(dtype="bfloat16", scale=128 ** -0.5, prologue=SAFE, has_h0=True, store_final=True,
                                   inplace=True), False),
    "decode_column_bf16": (kda_decode_columns, (128, 128),
                           dict(dtype="bfloat16", scale=128 ** -0.5, prologue=PLAIN, has_h0=True, store_final=True,
                                block_V=64), True),
    # the decode variants of serving: a 1-D pool with padding slots, and speculative decoding in place
    "decode_column_pool_bf16": (kda_decode_columns, (128, 128),
                                dict(dtype="bfloat16", scale=128 ** -0.5, prologue=PLAIN, has_h0=True, inplace=True,
                                     slot_mode=SlotMode(padding=True), block_V=128), False),
    "decode_tile_speculative_bf16": (kda_decode, (128, 128),
                                     dict(dtype="bfloat16", scale=128 ** -0.5, prologue=SAFE, has_h0=True,
                                          slot_mode=SPECULATIVE, state_v_first=True, block_V=16, threads=64), True),
    "decode_column_speculative_fp16": (kda_decode_columns, (64, 64),
                                       dict(dtype="float16", prologue=PLAIN, has_h0=True, slot_mode=SPECULATIVE,
                                            block_V=64), True),
    # the backward's programs (the intra stage as a kernel of its own: the recompute)
    "bwd_recompute_intra_bf16": (kda_intra, (128, 128, 64),
                                 dict(dtype="bfloat16", scale=128 ** -0.5, prologue=PLAIN, threads=256), False),
    "bwd_states_bf16": (kda_bwd_states, (128, 128, 64), dict(dtype="bfloat16", has_h0=True, block_V=32), False),
    "bwd_state_bf16": (kda_bwd_state, (128, 128, 64), dict(dtype="bfloat16", scale=128 ** -0.5, has_dht=True,
                                                          store_dh0=True, block_V=32), True),
    "bwd_state_fp16_vfirst_c32": (kda_bwd_state, (64, 64, 32), dict(dtype="float16", has_dht=True, store_dh0=True,
                                                                   state_v_first=True, block_V=32), False),
    "bwd_solve_bf16_safe": (kda_bwd_solve, (128, 128, 64), dict(dtype="bfloat16", scale=128 ** -0.5, prologue=SAFE,
                                                               block_V=32, threads=256), True),
    "bwd_solve_fp32_log_c32": (kda_bwd_solve, (64, 64, 32), dict(dtype="float32", scale=0.125, prologue=PLAIN,
                                                                block_V=32), False),
    "bwd_intra_bf16_safe": (kda_bwd_intra, (128, 128, 64), dict(dtype="bfloat16", scale=128 ** -0.5, prologue=SAFE,
                                                               block_K=64, block_V=32, threads=256), True),
    "bwd_intra_fp32_log": (kda_bwd_intra, (128, 128, 64), dict(dtype="float32", scale=0.125, prologue=PLAIN,
                                                              threads=256), True),
    "bwd_intra_fp16_log_c32": (kda_bwd_intra, (64, 64, 32), dict(dtype="float16", scale=0.125, prologue=PLAIN,
                                                                block_K=32, block_V=32), False),
    "bwd_prologue_bf16": (kda_bwd_prologue, (128,), dict(dtype="bfloat16", num_k_blocks=2, prologue=SAFE), False),
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_lowers_for_sm90a(name):
    factory, args, kwargs, build = PROGRAMS[name]
    source = cuda_source(factory(*args, target="cuda", **kwargs))
    assert "__global__" in source
    if build:
        if shutil.which("nvcc") is None:
            pytest.skip("nvcc not installed: lowering checked, compile skipped")
        nvcc_compile(source)


@pytest.mark.parametrize("slot_mode", [SlotMode(), SPECULATIVE], ids=["plain", "speculative"])
@pytest.mark.parametrize("state_v_first", [False, True])
def test_column_decode_loads_each_threads_own_state_column(state_v_first, slot_mode):
    """Regression: the state load of the column decode kernel must be bound to the thread index.  When it
    was written as a parallel loop over columns that only wrote registers, sm_90a lowering made it a serial
    loop in every thread, so all threads held the last column (H100 reference check: error 1.25).  The
    speculative variant's per-token stores and the final-state stores must be each thread's own column too."""
    source = cuda_source(kda_decode_columns(128, 128, dtype="bfloat16", prologue=Prologue(l2norm=True),
                                                 has_h0=True, store_final=not slot_mode.per_token, block_V=128,
                                                 state_v_first=state_v_first, slot_mode=slot_mode, target="cuda"))
    body = source[source.index("int slot"):source.index("for (int t = 0;")]  # the state load, before tokens
    assert "for (int j" not in body
    loads = [line for line in body.splitlines() if "h0[" in line]
    assert loads and all("threadIdx.x" in line for line in loads)
    stores = [line for line in source.splitlines() if "h0[" in line and "] = S[" in line]
    assert len(stores) == (1 if slot_mode.per_token else 0) and all("threadIdx.x" in line for line in stores)
    # the final state's stores (H200 reference check, before they were bound: final-state error 1.4)
    finals = [line for line in source.splitlines() if "ht[" in line and "] = S[" in line]
    assert len(finals) == (0 if slot_mode.per_token else 1) and all("threadIdx.x" in line for line in finals)
