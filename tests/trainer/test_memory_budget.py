"""The feedback phase's extra memory is bounded by FeedbackTrainer(memory_budget_mb=...)
(docs/memory.md): batching F(x + eps) across iterations stops at the budget.

Measured as the peak resident memory (VmHWM, reset through /proc/self/clear_refs) of one
FeedbackTrainer.step() in a fresh process, so earlier tests' allocations do not interfere.
"""

import json
import os
import subprocess
import sys

import pytest

import dtp_ext

SCRIPT = r"""
import json, sys, torch, dtp_ext
from torch import nn
from dtp_ext.trainer import feedback_bytes_per_iteration
torch.set_num_threads(1)
budget = float(sys.argv[1])
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
torch.manual_seed(0)
model = nn.Sequential(dtp_ext.Conv2d(3, 16, 3, padding=1),
                      dtp_ext.Conv2d(16, 32, 3, padding=1, activation="elu", pool=2))
trainer = dtp_ext.FeedbackTrainer(model, iterations=16, noise_std=0.1, lr=1e-4,
                                  memory_budget_mb=budget)
model(torch.randn(32, 3, 32, 32))
trainer.step()  # first call: one-off allocations (thread pools, kernels' caches)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident size
before = peak_mb()
trainer.step()
block = model[1]
print(json.dumps({"extra_mb": peak_mb() - before,
                  "chunk": trainer.chunk_iterations(block, block.recorded_input),
                  "per_iteration_mb": feedback_bytes_per_iteration(block, block.recorded_input) / 2**20}))
"""


def measure(budget_mb: float, workdir) -> dict:
    # The dtp_ext this test imported (an installed one, or the source tree built in place); run
    # from an empty folder so that the current directory cannot shadow it.
    root = os.path.dirname(os.path.dirname(os.path.abspath(dtp_ext.__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(budget_mb)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=workdir,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs"
)
def test_memory_budget_bounds_the_feedback_phase(tmp_path):
    small, large = measure(32, tmp_path), measure(4096, tmp_path)
    per_iteration = small["per_iteration_mb"]
    assert small["chunk"] == 2 and large["chunk"] >= 16  # 16 MB per iteration here
    # docs/memory.md: extra <= max(budget, one iteration) + two iterations' working set;
    # 8 MB of slack for the allocator's rounding.
    assert small["extra_mb"] <= 32 + 2 * per_iteration + 8, small
    # Without the cap the 16 iterations are batched and the peak grows accordingly: the chunk
    # holds eps, x + eps and the conv output of each (8 of the 16 MB the budget counts; 128 MB
    # against 49 MB when this bound was set).
    assert large["extra_mb"] > 2 * small["extra_mb"], (small, large)
