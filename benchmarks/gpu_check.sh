#!/usr/bin/env bash
# The one prepared GPU check, for a lent H100/H200 that has no internet: nothing is installed,
# the machine's python3 (with its own torch, pytest, pytest-benchmark, hypothesis) is used as is.
# In one call of under 10 minutes it
#   1. builds the extension in place with all cores, DTP_EXT_CUDA=1 (the CUDA kernels required;
#      archs: $TORCH_CUDA_ARCH_LIST, else the visible GPU's with PTX),
#   2. runs the CUDA and build tests with DTP_EXT_CUDA=1 (missing CUDA kernels fail, and the
#      fatbin's machine code and PTX are read with cuobjdump and checked), the bfloat16/float16
#      op tests on the GPU included (tests/precision/test_bfloat16_ops.py's cuda cases), and the
#      feedback averages and noise copies on the GPU (tests/trainer/test_alignment.py's),
#   3. runs the SimpleVGG GPU benchmarks (batch 128, paper iterations),
#   4. runs `python -m dtp_ext.train --device cuda` for 200 steps, then 200 with --precision bf16,
#   5. checks issue 3's targets (training step) and issue 10's (bfloat16 feedback phase) against
#      the benchmark's numbers,
#   6. runs compute-sanitizer's memcheck over a few short CUDA tests (no caching allocator, so
#      an out-of-bounds access is seen).
# Every stage has a time limit and the whole run a deadline (GPU_CHECK_BUDGET_S, default 540 s);
# each stage's exit code and time go into the summary, and a failed stage stops only the stages
# that need it. Full logs stay in a temporary folder (GPU_CHECK_LOGS to choose it); the output
# folder ${OUT:-/tmp/gpu_check} gets summary.txt (written stage by stage, with each log's tail),
# build_info.json, latest-cuda.json, train_summary.json and logs.tar.gz (when under 8 MiB).
# Usage (repository root): bash benchmarks/gpu_check.sh    Exit code 0 only if every stage passed.
set -uo pipefail
PY=${PYTHON:-python3}  # the device image's python3 holds PyTorch
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT" || exit 2
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d /tmp/gpu_check_logs.XXXXXX)}
mkdir -p "$LOGS"
SUMMARY=$OUT/summary.txt
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-540}))
MAX_JOBS=${MAX_JOBS:-$(nproc)}
export MAX_JOBS DTP_EXT_CUDA=1 PYTHONUNBUFFERED=1
STATUS=0
declare -A RC=()

say() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME LIMIT_S TAIL_LINES COMMAND...: runs COMMAND with its output in $LOGS/NAME.log, under
# min(LIMIT_S, time left); appends its exit code, time and log tail to the summary.
stage() {
  local name=$1 limit=$2 lines=$3
  shift 3
  local left=$((DEADLINE - $(date +%s)))
  if ((left < 15)); then
    RC[$name]=skipped
    say "== $name: SKIPPED (the ${GPU_CHECK_BUDGET_S:-540} s budget is spent)"
    STATUS=1
    return
  fi
  ((limit > left)) && limit=$left
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  RC[$name]=$rc
  ((rc != 0)) && STATUS=1
  local why=""
  ((rc == 124 || rc == 137)) && why=" (stopped at its ${limit} s limit)"
  say "== $name: exit $rc$why, $(($(date +%s) - t0)) s"
  ((rc != 0 && lines < 40)) && lines=40
  tail -n "$lines" "$LOGS/$name.log" | cut -c1-400 | sed 's/^/   | /' >>"$SUMMARY"
}

skip() {  # skip NAME REASON
  RC[$1]=skipped
  STATUS=1
  say "== $1: SKIPPED ($2)"
}

: >"$SUMMARY"
say "dtp_ext GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), logs in $LOGS"
say "GPU: $( (nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || echo 'nvidia-smi failed') 2>&1 | head -3)"
say "$("$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda, "| GPU visible to torch:", torch.cuda.is_available())' 2>&1 | tail -1)"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  say "!! torch sees no GPU: the CUDA tests will skip and the GPU stages fail; the check FAILS"
  STATUS=1
fi
say "nvcc: $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not on PATH') | MAX_JOBS=$MAX_JOBS | TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset, so the arch of the GPU + PTX}"

# 1. Build (in place; an editable install would need pip to reach nothing, but a plain
#    build_ext needs no index at all).
stage build 330 12 "$PY" setup.py build_ext --inplace
grep -m1 "dtp_ext: building" "$LOGS/build.log" >>"$SUMMARY"
BUILT=0
if [[ ${RC[build]} == 0 ]] && "$PY" -c "import dtp_ext" >/dev/null 2>&1; then
  BUILT=1
  "$PY" - "$OUT/build_info.json" >"$LOGS/build_info.log" 2>&1 <<'PY'
import json, sys
import dtp_ext
info = dtp_ext.build_info()
json.dump(info, open(sys.argv[1], "w"), indent=1)
print({k: info.get(k) for k in ("torch_version", "cuda_kernels", "cuda_arch_list", "cuda_device",
                                "cuda_device_capability", "cuda_device_image")})
PY
  say "build_info: $(tail -1 "$LOGS/build_info.log")"
fi

# 2. CUDA and build tests: with DTP_EXT_CUDA=1 nothing here may skip for a missing build.
if ((BUILT)); then
  stage tests 180 15 "$PY" -m pytest tests/cuda/test_kernels_match_cpu.py tests/cuda/test_dtypes_layouts_streams.py tests/cuda/test_cuda_graphs.py tests/packaging/test_built_library.py tests/packaging/test_setup_py.py \
    tests/precision/test_bfloat16_ops.py \
    tests/ops/test_registered_ops.py tests/ops/test_bad_and_extreme_inputs.py -q -p no:cacheprovider -rfEs
  # The feedback averages and noise copies on the GPU: the file's cuda cases only (its CPU
  # cases, some minutes long, run in CI).
  stage alignment 90 15 "$PY" -m pytest tests/trainer/test_alignment.py -m cuda -q \
    -p no:cacheprovider -rfEs
else
  skip tests "no build"
  skip alignment "no build"
fi

# 3. Benchmarks.
if ((BUILT)); then
  rm -f benchmarks/results/latest-cuda.json
  stage bench 200 14 env DTP_BENCH_DEVICE=cuda DTP_BENCH_BATCHES="${DTP_BENCH_BATCHES:-128}" \
    DTP_BENCH_ROUNDS="${DTP_BENCH_ROUNDS:-5}" "$PY" -m pytest benchmarks/ -q -p no:cacheprovider
  cp benchmarks/results/latest-cuda.json "$OUT/" 2>/dev/null
else
  skip bench "no build"
fi

# 4. The training command on the GPU (a short L-DRL run on the shipped MNIST).
if ((BUILT)); then
  stage train 120 6 "$PY" -m dtp_ext.train --device cuda --max-steps 200 --no-progress \
    --out "$LOGS/train_run"
  cp "$LOGS/train_run/summary.json" "$OUT/train_summary.json" 2>/dev/null
  grep -m1 "test accuracy" "$LOGS/train.log" >>"$SUMMARY"
  stage train_bf16 90 6 "$PY" -m dtp_ext.train --device cuda --max-steps 200 --no-progress \
    --precision bf16 --out "$LOGS/train_bf16_run"
  grep -m1 "test accuracy" "$LOGS/train_bf16.log" >>"$SUMMARY"
else
  skip train "no build"
  skip train_bf16 "no build"
fi

# 5. Issue 3's targets, from the benchmark run: a training step >= 5x faster than the
#    reference, within 10x of backprop, peak memory <= 2x the reference's; issue 10's: the
#    feedback phase in bfloat16 >= 1.7x faster than in float32 and >= 3.5x than the reference.
if [[ -f $OUT/latest-cuda.json ]]; then
  stage targets 30 10 "$PY" - "$OUT/latest-cuda.json" <<'PY'
import json, sys
rows = {(r["phase"], r["batch"]): r for r in json.load(open(sys.argv[1]))["rows"]}
ok = True
for (phase, batch), r in sorted(rows.items()):
    if phase == "feedback-phase" and r.get("fused_over_fused_bf16"):
        for name, value, target in (("bf16 vs fp32 fused", r["fused_over_fused_bf16"], 1.7),
                                    ("bf16 vs reference", r["reference_over_fused_bf16"], 3.5)):
            ok &= value >= target
            print(f"target batch {batch}: {name:<20} {value:>15.2f}x  "
                  f"{'PASS' if value >= target else 'FAIL'} (>= {target}x)")
    if phase != "training-step":
        continue
    mem_f, mem_r = r["fused"]["peak_mem_mb"], r["reference"]["peak_mem_mb"]
    checks = [("vs reference >= 5x", r["reference_over_fused"] >= 5, f"{r['reference_over_fused']:.2f}x"),
              ("vs backprop <= 10x", r["fused_over_backprop"] <= 10, f"{r['fused_over_backprop']:.2f}x"),
              ("peak mem <= 2x ref", mem_f <= 2 * mem_r, f"{mem_f:.0f} / {mem_r:.0f} MB")]
    for name, passed, value in checks:
        ok &= passed
        print(f"target batch {batch}: {name:<20} {value:>16}  {'PASS' if passed else 'FAIL'}")
sys.exit(0 if ok else 1)
PY
  {
    echo "-- benchmark ratios:"
    grep -A8 "dtp_ext ratios" "$LOGS/bench.log"
  } >>"$SUMMARY"
else
  skip targets "no benchmark results"
fi

# 6. memcheck over short CUDA tests: every op's CUDA kernels (loss, both feedback loops, target
#    propagation, weight gradients) on a linear and two conv blocks, float64, small sizes.
#    Last, so that it can only take the time the other stages left.
SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null)
if ((BUILT)) && [[ -n $SANITIZER ]]; then
  stage memcheck 150 12 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 86 --print-limit 20 \
    "$PY" -m pytest tests/cuda/test_kernels_match_cpu.py -q -p no:cacheprovider -x \
    -k "(loss_equals_cpu or feedback_loop_targets or reconstruction_loop) and (conv-elu-pool2 or linear-tanh)"
  grep -m1 "ERROR SUMMARY" "$LOGS/memcheck.log" >>"$SUMMARY"
elif ((BUILT)); then
  skip memcheck "compute-sanitizer not found"
else
  skip memcheck "no build"
fi

# The full logs, if small enough to come back.
tar -czf "$LOGS.tar.gz" -C "$(dirname "$LOGS")" --exclude="$(basename "$LOGS")/train_run" "$(basename "$LOGS")" 2>/dev/null
if [[ -f $LOGS.tar.gz ]] && (($(stat -c %s "$LOGS.tar.gz") < 8 * 1024 * 1024)); then
  cp "$LOGS.tar.gz" "$OUT/logs.tar.gz"
fi

line="stages:"
for name in build tests bench train train_bf16 targets memcheck; do
  line+=" $name=${RC[$name]:-?}"
done
say "$line"
say "total $(($(date +%s) - START)) s; overall: $([[ $STATUS == 0 ]] && echo PASS || echo FAIL)"
exit $STATUS
