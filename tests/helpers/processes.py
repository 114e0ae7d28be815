"""A tiny `dtp-ext train` run in its own process, and waiting for its steps: for the tests of
signals and of the run-folder lock."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dtp_ext
from tests.helpers.tiny_runs import tiny_args

ROOT = Path(dtp_ext.__file__).resolve().parent.parent  # where `-m dtp_ext.train` imports from

ARGS = [*tiny_args(640), "--log-every", "1"]


def launch(out: Path, *extra) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "dtp_ext.train", *ARGS, "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=out.parent,
        env=env,
        # Ctrl-C's default disposition for the run: a test runner started as a background job
        # (or under nohup) has SIGINT ignored, which the run would rightly keep.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_lines(out: Path, proc: subprocess.Popen, count: int, timeout: float = 180.0):
    """Until OUT/steps.jsonl has `count` lines (training has started and done that many steps)."""
    path, start = out / "steps.jsonl", time.monotonic()
    while time.monotonic() - start < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {count} steps: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {count} steps in {timeout} s")
