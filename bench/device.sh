#!/usr/bin/env bash
# Check and time everything GPU-side in one go, from the repository root:
#
#   SECTIONS="tests chunk sweep decode" OUT=/tmp/out bash bench/device.sh
#
# Sections, run in the order given (default: tests chunk train sweep decode overhead breakdown cold kimi model modeltrain onnx):
#   tests      pytest -m gpu (every GPU test; TESTS_ARGS adds arguments, e.g. "-n 8"), then the state-pool and
#              padding tests (unmarked: their kernel cases run on the GPU when there is one)
#   chunk      bench/bench_chunk.py --what shapes: forward at the standard shapes, both gates
#   sweep      bench/bench_chunk.py --what sweep: forward against T, plots to $OUT/plots
#   train      bench/bench_chunk_bwd.py: forward + backward at the standard shapes, three settings, peers too
#   decode     bench/bench_decode.py --eager --config-sweep (graph replays, eager calls, every Triton config)
#   overhead   bench/bench_overhead.py --decode-model: per-call host time; the model's decode step in a graph
#   kimi       bench/bench_kimi_transformers.py: transformers' Kimi Linear with three KDA providers
#   breakdown  bench/bench_breakdown.py --gates log,safe: per-kernel GPU time, ours and the peers
#   trainbreak bench/bench_breakdown.py --training prenorm_log: the kernels of one forward + backward, ours alone
#              first (FLA's first compile of its backward can take minutes), then with FLA and cuDNN-frontend
#   prebuild   python -m kda_compile.prebuild: remake the shipped compiled Triton kernels for this GPU (after a
#              Triton kernel or the shipped table changed); the set comes back as $OUT/prebuilt.tgz
#   ncu        Nsight Compute on a few forward calls (every kernel of ours: regex:^kda_)
#   tune       python -m kda_compile.autotune --output $OUT/tuned.json (TUNE_ARGS adds arguments)
#   cold       bench/bench_cold_start.py: fresh process to the first chunk_kda, ours and FLA
#   model      bench/bench_model.py: the hybrid model against full attention
#   modeltrain bench/bench_model.py --train: a training step of the hybrid model, ours against FLA's KDA and full
#              attention (FLA's first compile of its backward can take minutes)
#   onnx       bench/bench_onnx.py: onnxruntime against PyTorch eager (CPU)
# Each section runs under `timeout` (LIMIT_<SECTION> seconds, e.g. LIMIT_CHUNK=300) with its output in
# $OUT/<section>.log, printed when it ends with its exit status; the markdown tables also go to
# $OUT/results.md. <SECTION>_ARGS (e.g. CHUNK_ARGS="--gates log") are appended to a section's command.
# SETUP, when set, is run first (e.g. a script that installs the peers); the package is installed
# editable when it does not import yet.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
SECTIONS=${SECTIONS:-tests chunk train sweep decode overhead breakdown cold kimi model modeltrain onnx}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
mkdir -p "$OUT/plots"
echo "sections: $SECTIONS; output in $OUT"

run() {  # run NAME DEFAULT_LIMIT CMD...: bounded, logged to $OUT/NAME.log, printed afterwards
  local name=$1 limit_var="LIMIT_${1^^}" args_var="${1^^}_ARGS"; local limit=${!limit_var:-$2}; shift 2
  echo; echo "=== $name ($(date -u +%T), limit ${limit}s): $* ${!args_var:-}"
  # shellcheck disable=SC2086  # the extra arguments are meant to split
  timeout -k 10 "$limit" "$@" ${!args_var:-} > "$OUT/$name.log" 2>&1
  local rc=$?
  cat "$OUT/$name.log"
  echo "=== $name exit $rc$( [ $rc -eq 124 ] && echo ' (timed out)')"
}

if [ -n "${SETUP:-}" ]; then
  echo "=== setup: $SETUP"
  bash -c "$SETUP" || { echo "setup failed"; exit 1; }
fi
$PY -c "import kda_compile" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e . \
  || { echo "installing the package failed"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$PY -m kda_compile info

for section in $SECTIONS; do
  case $section in
    tests)     run tests 600 $PY -m pytest -m gpu -q -rs --tb=short -p no:cacheprovider tests
               # unmarked files whose kernel cases run on the GPU when there is one
               run tests_serving 300 $PY -m pytest -q -rs --tb=short -p no:cacheprovider tests/test_chunk_state_pool.py \
                 tests/test_serving_padding.py ;;
    chunk)     run chunk 420 $PY bench/bench_chunk.py --what shapes --out "$OUT/results.md" ;;
    sweep)     run sweep 540 $PY bench/bench_chunk.py --what sweep --plots "$OUT/plots" --out "$OUT/results.md" ;;
    train)     run train 540 $PY bench/bench_chunk_bwd.py --out "$OUT/results.md" ;;
    decode)    run decode 240 $PY bench/bench_decode.py --eager --config-sweep --plots "$OUT/plots" --out "$OUT/results.md" ;;
    overhead)  run overhead 240 $PY bench/bench_overhead.py --device cpu,cuda --decode-model ;;
    kimi)      run kimi 300 $PY bench/bench_kimi_transformers.py --preset published --layers 4 --device cuda \
                 --dtype bfloat16 --prompt 4096 --decode 64 --reps 2 ;;
    breakdown) run breakdown 420 $PY bench/bench_breakdown.py --gates log,safe --out "$OUT/results.md" ;;
    trainbreak) run trainbreak_ours 240 $PY bench/bench_breakdown.py --training prenorm_log --no-peers \
                 --shapes 2,8192,16 1,32768,16 8,4096,32 --out "$OUT/results.md"
               run trainbreak 420 $PY bench/bench_breakdown.py --training prenorm_log --shapes 2,8192,16 \
                 --out "$OUT/results.md" ;;
    prebuild)  run prebuild 300 $PY -m kda_compile.prebuild
               tar czf "$OUT/prebuilt.tgz" kernels_triton/prebuilt ;;
    ncu)       run ncu 240 ncu --clock-control none --kernel-name regex:^kda_ --launch-skip 5 --launch-count 5 \
                 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
                 --section MemoryWorkloadAnalysis $PY bench/bench_breakdown.py --ncu --backends triton \
                 --shapes 2,8192,16 --calls 3 ;;
    tune)      run tune 540 $PY -m kda_compile.autotune --output "$OUT/tuned.json" ;;
    cold)      run cold 540 $PY bench/bench_cold_start.py --timeout 250 --out "$OUT/results.md" ;;
    model)     run model 300 $PY bench/bench_model.py --device cuda --seq-lens 8192 32768 --compile \
                 --out "$OUT/results.md" ;;
    modeltrain) run modeltrain 420 $PY bench/bench_model.py --device cuda --train --seq-lens 8192 \
                 --out "$OUT/results.md" ;;
    onnx)      run onnx 300 $PY bench/bench_onnx.py --rounds 5 --threads 1 --out "$OUT/results.md" ;;
    *)         echo "unknown section '$section' (known: tests chunk train sweep decode overhead breakdown trainbreak"\
                    "prebuild ncu tune cold kimi model onnx)" ;;
  esac
done
echo; echo "done at $(date -u +%T); tables in $OUT/results.md, plots in $OUT/plots"
