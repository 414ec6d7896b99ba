#!/usr/bin/env bash
# One device call that checks and times everything GPU-side, most important first, each section under its
# own time limit so a slow one cannot starve the rest.  Run on the device machine from the repo root:
#   bash bench/device_all.sh          (carry .device-bundle; logs and tables land in $OUT)
# Sections: setup, GPU tests, forward bench, decode bench, autotune (writes the H100 table), cold start,
# model bench.  Override a section's limit with e.g. LIMIT_TESTS=200; pick sections with
# SECTIONS="tests chunk" (default: all of tests chunk decode tune cold model).  Measured 2026-11-23 on an H100:
# the default limits were too short for one call (FLA's and TileLang's first compiles take ~2 min each), so
# split the sections over two calls, e.g. SECTIONS="tests tune cold" then SECTIONS="chunk decode model".
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
log="$OUT/all.log"
SECTIONS=${SECTIONS:-tests chunk decode tune cold model}  # also: sweep profile triton breakdown
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
section() { echo; echo "=== $1 ($(date -u +%T), limit ${2}s) ==="; }
run() {  # run LIMIT FILE CMD...: bounded, output to the terminal and appended to FILE
  local limit=$1 file=$2; shift 2
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$file"
  echo "[exit ${PIPESTATUS[0]}]" | tee -a "$file"
}
{
section setup 120
bash .device-bundle/setup.sh && export PYTHONPATH=/tmp/site && \
  python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "setup failed"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -m kda_compile info

if want tests; then
# pytest processes side by side (TEST_GROUPS: ';'-separated groups of pytest arguments) (TileLang's and Triton's first compiles are CPU-bound, 16 cores), each
# with its own log; correctness tests only, so sharing the GPU does not matter
section "GPU tests" "${LIMIT_TESTS:-420}"
pids=()
TEST_GROUPS=${TEST_GROUPS:-tests/test_tilelang_chunk.py;tests/test_tilelang_decode.py;tests/test_triton_gpu.py tests/test_gpu_reference.py;tests/test_model_compile.py}
IFS=';' read -ra groups <<< "$TEST_GROUPS"
for group in "${groups[@]}"; do
  name=$(basename "${group%% *}" .py)
  timeout -k 5 "${LIMIT_TESTS:-420}" python3 -m pytest -v --tb=short -m gpu -rs -p no:cacheprovider --durations=5 ${PYTEST_ARGS:-} $group \
    > "$OUT/gpu_$name.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; echo "[pytest exit $?]"; done
for f in "$OUT"/gpu_*.log; do echo "--- $f"; sed -n '/short test summary\|passed\|failed\|FAILED\|Error/p' "$f"; done
fi

if want profile; then
# hardware counters of one launch of each Triton forward kernel (Firecracker machines only; see KINDS.md);
# PROFILE_ARGS go to bench/profile_forward.py, e.g. PROFILE_ARGS="--config {\"intra_impl\":\"rows\"}"
section "ncu profile" "${LIMIT_PROFILE:-150}"
run "${LIMIT_PROFILE:-150}" "$OUT/ncu.txt" ncu --clock-control none --kernel-name "regex:_chunk_|_split_" --launch-skip 5 --launch-count 5 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section MemoryWorkloadAnalysis python3 bench/profile_forward.py ${PROFILE_ARGS:-}
fi

if want breakdown; then
# per-kernel GPU time of ours and FLA at the standard shapes (BREAKDOWN_ARGS go to bench/kernel_breakdown.py)
section "kernel breakdown" "${LIMIT_BREAKDOWN:-240}"
run "${LIMIT_BREAKDOWN:-240}" "$OUT/breakdown.md" python3 bench/kernel_breakdown.py ${BREAKDOWN_ARGS:-}
fi

if want triton; then
# Triton backend vs FLA with a given config (TRITON_CONFIG, key=value,...), stage times, optional sweep
section "Triton timing" "${LIMIT_TRITON:-300}"
run "${LIMIT_TRITON:-300}" "$OUT/triton.log" python3 bench/device_triton.py --out "$OUT" \
  --sections "${TRITON_SECTIONS:-timing}" --config "${TRITON_CONFIG:-}" --budget "$(( ${LIMIT_TRITON:-300} - 20 ))" \
  ${TRITON_ARGS:-}
fi

if want sweep; then
section "Triton config sweep" "${LIMIT_SWEEP:-240}"
run "${LIMIT_SWEEP:-240}" "$OUT/sweep.log" python3 bench/device_triton.py --out "$OUT" --sections sweep \
  --budget "$(( ${LIMIT_SWEEP:-240} - 20 ))"
fi

want chunk && section "forward bench" "${LIMIT_CHUNK:-190}" && \
run "${LIMIT_CHUNK:-190}" "$OUT/bench.md" python3 bench/bench_chunk.py --stages

want decode && section "decode bench" "${LIMIT_DECODE:-35}" && \
run "${LIMIT_DECODE:-35}" "$OUT/bench.md" python3 bench/bench_decode.py

if want tune; then
section autotune "${LIMIT_TUNE:-300}"
cp kda_compile/tables/h100.json "$OUT/h100.json" 2>/dev/null  # merge into the shipped table, not replace it
TUNE_BUCKETS=${TUNE_BUCKETS:-chunk/bf16/K128V128/T8k/dense chunk/bf16/K128V128/Tlong/dense \
  recurrent/bf16/K128V128/t1/dense chunk/bf16/K128V128/T1k/dense chunk/bf16/K128V128/T8k/varlen \
  recurrent/bf16/K128V128/tfew/dense}
run "${LIMIT_TUNE:-300}" "$OUT/autotune.log" python3 -m kda_compile.autotune --output "$OUT/h100.json" \
  --budget "${TUNE_BUDGET:-270}" --max-configs "${TUNE_MAX_CONFIGS:-6}" ${TUNE_FORCE:+--force} ${TUNE_ARGS:-} \
  $(for b in $TUNE_BUCKETS; do printf -- '--bucket %s ' "$b"; done)
fi

# Ship what was just measured, so the cold start below runs with "the shipped H100 table".
mkdir -p kda_compile/tables && [ -s "$OUT/h100.json" ] && cp "$OUT/h100.json" kda_compile/tables/h100.json

want cold && section "cold start" "${LIMIT_COLD:-330}" && \
run "${LIMIT_COLD:-330}" "$OUT/bench.md" python3 bench/bench_cold_start.py --providers ours,fla --timeout 160

want model && section "model bench" "${LIMIT_MODEL:-150}" && \
run "${LIMIT_MODEL:-150}" "$OUT/bench.md" python3 bench/bench_model.py --device cuda --seq-lens 8192 32768 --compile
} 2>&1 | tee -a "$log"
