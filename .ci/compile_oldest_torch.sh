#!/usr/bin/env bash
# Compiles the extension, C++ and CUDA kernels, against the oldest torch that pyproject.toml
# claims ("torch>=X.Y"), in a fresh virtual environment, then imports it there and checks
# build_info(). A lent GPU machine may come with an older torch than the one CI tests with (the
# H200s have had 2.11.0+cu130); this makes a build error show up here, not in its minutes.
# Then it runs, on the CPU with that torch, the build and setup tests and the tests that
# tests/cuda/test_kernels_match_cpu.py draws its cases from (fake kernels, finite checks, bad and extreme inputs, registered ops).
# Usage (repository root): bash .ci/compile_oldest_torch.sh   (CI runs it after the tests)
# Needs nvcc (CUDA 13: torch's PyPI wheels from 2.11 on are CUDA 13 builds) and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
oldest=$(grep -oE '"torch>=[0-9]+\.[0-9]+' pyproject.toml | head -1 | cut -d= -f2)
if [[ -z $oldest ]]; then
  echo "pyproject.toml claims no 'torch>=X.Y' lower bound" >&2
  exit 1
fi
WORK=$(mktemp -d /tmp/dtp_oldest_torch.XXXXXX)
trap 'rm -rf "$WORK"' EXIT  # the environment is ~5 GB
echo "+ compiling against the oldest claimed torch, $oldest.*, in $WORK"

t0=$(date +%s)
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "torch==$oldest.*" ninja pybind11 setuptools wheel numpy \
  tqdm matplotlib pyyaml pytest hypothesis "nvidia-cuda-cuobjdump>=13,<14"
t1=$(date +%s)
echo "+ environment ready in $((t1 - t0)) s: torch $("$WORK/venv/bin/python" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"

DTP_EXT_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$WORK/venv/bin/python" setup.py build_ext \
  --build-temp "$WORK/temp" --build-lib "$WORK/lib" >"$WORK/build.log" 2>&1 || {
  grep -m1 "dtp_ext: building" "$WORK/build.log" || true
  grep -B2 -A12 -m20 -E "error|Error" "$WORK/build.log" | head -150
  echo "compiling against torch $oldest failed (the full log's last lines above and below)" >&2
  tail -30 "$WORK/build.log"
  exit 1
}
t2=$(date +%s)
grep -m1 "dtp_ext: building" "$WORK/build.log"
echo "+ built in $((t2 - t1)) s"

# A copy of the tree with the library just built (never the tree's own _C, built against
# another torch), imported and tested from there.
mkdir -p "$WORK/tree"
tar -C "$ROOT" --exclude='_C*.so' --exclude=__pycache__ --exclude=dtp_ext/data -cf - \
  csrc dtp_ext tests benchmarks .ci setup.py pyproject.toml README.md | tar -C "$WORK/tree" -xf -
cp "$WORK"/lib/dtp_ext/_C*.so "$WORK/tree/dtp_ext/"
cd "$WORK/tree"
"$WORK/venv/bin/python" - <<'PY'
import torch
import dtp_ext
from dtp_ext import ops
info = dtp_ext.build_info()
print("build_info:", {k: info[k] for k in ("torch_version", "torch_version_built_against",
                                           "cuda_built", "cuda_arch_list", "cuda_kernels")})
assert info["torch_version_built_against"] == torch.__version__, info
assert info["cuda_built"] and info["cuda_kernels"] == list(ops.OP_NAMES), info
assert info["cpu_kernels"] == list(ops.OP_NAMES), info
# One fused CPU step through the drop-in layers, as a smoke test of the compiled library.
torch.manual_seed(0)
model = torch.nn.Sequential(dtp_ext.Conv2d(3, 4, 3, padding=1, activation="elu", pool=2),
                            torch.nn.Flatten(), dtp_ext.Linear(64, 10))
trainer = dtp_ext.FeedbackTrainer(model, iterations=3, noise_std=0.1, lr=1e-3)
out = model(torch.randn(2, 3, 8, 8))
report = trainer.step()
torch.nn.functional.cross_entropy(out, torch.tensor([1, 2])).backward()
assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
print("smoke step:", report.kernels)
PY
t3=$(date +%s)
echo "+ tests with torch $oldest (CPU; DTP_EXT_CUDA=1: the fatbin is checked too)"
DTP_EXT_CUDA=1 "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider tests/packaging/test_built_library.py \
  tests/packaging/test_setup_py.py tests/ops/test_registered_ops.py tests/ops/test_fake_kernels.py tests/ops/test_finite_checks.py \
  tests/ops/test_bad_and_extreme_inputs.py tests/trainer/test_refusals_and_restores.py \
  tests/layers/test_layers.py tests/cuda/test_kernels_match_cpu.py
echo "+ torch $oldest: compiled in $((t2 - t1)) s, imported, ran a step and the tests ($(($(date +%s) - t3)) s); $(($(date +%s) - t0)) s in all"
