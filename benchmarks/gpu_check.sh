#!/usr/bin/env bash
# The one prepared GPU check (issue 3): on a lent H100/H200, in one call of under 8 minutes,
#   1. builds the extension with all cores for sm_90 (CUDA kernels required),
#   2. runs the CUDA tests with "CUDA kernels missing" turned into a failure,
#   3. runs the SimpleVGG GPU benchmarks (batch 128, paper iterations),
#   4. runs `dtp-ext train --device cuda` for 200 steps,
#   5. prints a short table last (card, versions, ratios, peak memory, the run's accuracy).
# Usage (repo root): bash benchmarks/gpu_check.sh    Output files go to ${OUT:-/tmp/gpu_check}.
set -uo pipefail
PY=${PYTHON:-python3}  # the device image's python3 holds PyTorch
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} DTP_EXT_CUDA=1
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

start=$(date +%s)
"$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
grep -m1 "dtp_ext: building" "$OUT/build.log"

DTP_EXT_REQUIRE_CUDA=1 "$PY" -m pytest tests/test_cuda.py tests/test_build.py -q -p no:cacheprovider \
    > "$OUT/tests.log" 2>&1 || status=1
tail -3 "$OUT/tests.log"

DTP_BENCH_DEVICE=cuda DTP_BENCH_BATCHES=${DTP_BENCH_BATCHES:-128} DTP_BENCH_ROUNDS=${DTP_BENCH_ROUNDS:-5} \
    "$PY" -m pytest benchmarks/ -q -p no:cacheprovider > "$OUT/bench.log" 2>&1 || status=1
cp benchmarks/results/latest-cuda.json "$OUT/" 2>/dev/null

# The training command on the GPU (a short L-DRL run on the shipped MNIST).
"$PY" -m dtp_ext.train --device cuda --max-steps 200 --no-progress --out "$OUT/train" \
    > "$OUT/train.log" 2>&1 || status=1

echo "==================== dtp_ext GPU check ===================="
cat "$OUT/gpu.txt"
grep -A8 "dtp_ext ratios" "$OUT/bench.log" || tail -30 "$OUT/bench.log"
grep -E "passed|failed" "$OUT/tests.log" | tail -1
grep -m1 "test accuracy" "$OUT/train.log" || tail -5 "$OUT/train.log"
# Issue 3's targets, from the same run: step >= 5x faster than the reference, within 10x of
# backprop, peak memory <= 2x the reference's.
"$PY" - "$OUT/latest-cuda.json" <<'PY' || status=1
import json, sys
rows = {(r["phase"], r["batch"]): r for r in json.load(open(sys.argv[1]))["rows"]}
ok = True
for (phase, batch), r in sorted(rows.items()):
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
exit $status
