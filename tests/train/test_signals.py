"""SIGINT and SIGTERM stop `dtp-ext train` at the next step boundary with a
checkpoint, one line saying how to resume, and exit code 128 + signal; --resume then ends bitwise
identical (on the CPU, same --threads) to an uninterrupted run. Real signals to a real process
(`python -m dtp_ext.train`), plus in-process checks of a signal arriving while the checkpoint is
written and of --checkpoint-every. The torchrun version (one rank signalled, all ranks stop at
the same step) is in tests/distributed/test_train_ranks.py."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from dtp_ext.cli import main
from dtp_ext.train import checkpoint as ckpt
from dtp_ext.train import runner
from tests.helpers.processes import ARGS, launch, wait_for_lines
from tests.helpers.tiny_runs import tiny_args

# 640 images, batch 32: 20 steps in one epoch; a steps.jsonl line after every step.
STEPS = 20


def final_state(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=False)


def strip(path: Path, drop_stops=False):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if "time" not in k}
        for r in records
        if not (drop_stops and r.get("kind") == "stop")
    ]


def assert_same_run(a: Path, b: Path):
    """Bitwise the same weights, optimizer, feedback state, RNG and logs (times aside)."""
    sa, sb = final_state(a), final_state(b)
    assert sa["global_step"] == sb["global_step"]
    for key in ("model", "algorithm"):
        for name in sa[key]:
            if isinstance(sa[key][name], torch.Tensor):
                assert torch.equal(sa[key][name], sb[key][name]), (key, name)
    assert str(sa["algorithm"]) == str(sb["algorithm"])
    for k, state in sa["optimizer"]["state"].items():
        assert torch.equal(
            state["momentum_buffer"], sb["optimizer"]["state"][k]["momentum_buffer"]
        ), k
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    assert sa["counter"] == sb["counter"]
    assert strip(a / "metrics.jsonl") == strip(b / "metrics.jsonl")
    # steps.jsonl: the interrupted run has one extra "stop" line; the regular lines are the same
    assert strip(a / "steps.jsonl", drop_stops=True) == strip(b / "steps.jsonl", drop_stops=True)
    summary_a, summary_b = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("test_accuracy", "test_loss", "global_step", "alignment", "finished"):
        assert summary_a[key] == summary_b[key], key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", *ARGS, "--out", str(out)]) == 0
    assert final_state(out)["global_step"] == STEPS
    return out


@pytest.mark.parametrize(
    "signals, code",
    [
        ((signal.SIGINT, signal.SIGTERM), 130),  # Ctrl-C, then a second signal while stopping
        ((signal.SIGTERM,), 143),  # a cluster's preemption
    ],
    ids=["sigint-then-sigterm", "sigterm"],
)
@pytest.mark.integration
def test_a_real_signal_saves_and_resume_is_bitwise(reference, tmp_path, capsys, signals, code):
    out = tmp_path / "run"
    proc = launch(out)
    wait_for_lines(out, proc, 2)
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    name = signal.Signals(signals[0]).name
    stopped = final_state(out)["global_step"]
    assert 2 <= stopped < STEPS
    assert (
        f"interrupted by {name} at step {stopped} (epoch 1, step {stopped} of {STEPS}); checkpoint saved in "
        f"{out}; continue with: dtp-ext train --resume --out {out}"
    ) in stderr, stderr
    assert not (out / ".lock").exists()  # released on the way out
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert f"resumed from step {stopped} " in capsys.readouterr().out
    assert_same_run(reference, out)


@pytest.mark.integration
def test_a_killed_run_leaves_no_stale_lock(reference, tmp_path, capsys):
    """Point 8 with point 7's --checkpoint-every: SIGKILL (no handler can run) leaves the .lock
    file behind, unlocked (the kernel drops the flock); --resume takes it over and continues
    from the last --checkpoint-every checkpoint, ending bitwise like the uninterrupted run."""
    out = tmp_path / "run"
    proc = launch(out, "--checkpoint-every", "3")
    wait_for_lines(out, proc, 7)  # step 7 logged: the checkpoint of step 6 is written
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = final_state(out)["global_step"]
    assert saved % 3 == 0 and 6 <= saved < STEPS, saved
    assert (out / ".lock").exists()
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert f"resumed from step {saved} " in capsys.readouterr().out
    assert_same_run(
        reference, out
    )  # --checkpoint-every changes when it saves, not what it computes


@pytest.mark.integration
def test_a_signal_while_the_checkpoint_is_written(tmp_path, monkeypatch, capfd):
    """SIGTERM during step 2 (the run stops after step 3, the last of the first epoch of 3 steps
    here), then SIGINT while the checkpoint is being written: the save completes, the file is
    sound, the exit code is SIGTERM's, and --resume ends bitwise like an uninterrupted run."""
    tiny = [*tiny_args(), "--epochs", "2"]
    full = tmp_path / "full"
    assert main(["train", *tiny, "--out", str(full)]) == 0
    inner_step, inner_save = runner.Run._train_step, ckpt.save_atomic
    saves = []

    def step(self, *args, **kwargs):
        value = inner_step(self, *args, **kwargs)
        if self.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the flag is read by the next step
        return value

    def save(state, path, **kwargs):
        saves.append(state["global_step"])
        os.kill(os.getpid(), signal.SIGINT)  # the handler only notes it; the save goes on
        return inner_save(state, path, **kwargs)

    monkeypatch.setattr(runner.Run, "_train_step", step)
    monkeypatch.setattr(ckpt, "save_atomic", save)
    out = tmp_path / "stopped"
    capfd.readouterr()
    # Ctrl-C's usual handler, even under a runner started with SIGINT ignored (the run keeps an
    # ignored signal ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(["train", *tiny, "--out", str(out)])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 143
    err = capfd.readouterr().err  # the handler writes to fd 2
    assert "SIGINT received: already stopping" in err and "Traceback" not in err, err
    assert "interrupted by SIGTERM at step 3 (epoch 1, step 3 of 3)" in err, err
    assert saves == [3]
    state = ckpt.read(out / "checkpoint.pt")  # complete and sound
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (3, 0, 3)
    monkeypatch.undo()
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert_same_run(full, out)


@pytest.mark.integration
def test_checkpoint_every(tmp_path, monkeypatch):
    """--checkpoint-every 2 on 3 epochs of 3 steps: saves after steps 2, 4, 6, 8 and at every
    epoch's end (3, 6, 9), once each, and not otherwise."""
    saved = []
    inner = ckpt.save_atomic
    monkeypatch.setattr(
        ckpt,
        "save_atomic",
        lambda state, path, **kw: saved.append(state["global_step"]) or inner(state, path, **kw),
    )
    assert (
        main(
            [
                "train",
                *tiny_args(test=32, eval=None),
                "--epochs",
                "3",
                "--algorithm",
                "bp",
                "--checkpoint-every",
                "2",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    assert saved == [2, 3, 4, 6, 8, 9]
    saved.clear()
    assert (
        main(
            [
                "train",
                *tiny_args(test=32, eval=None),
                "--epochs",
                "3",
                "--algorithm",
                "bp",
                "--out",
                str(tmp_path / "plain"),
            ]
        )
        == 0
    )
    assert saved == [3, 6, 9]


@pytest.mark.parametrize("value", ["0", "-3"])
def test_checkpoint_every_must_be_a_positive_whole_number(tmp_path, capsys, value):
    assert main(["train", "--checkpoint-every", value, "--out", str(tmp_path / "r")]) == 2
    assert f"checkpoint_every must be >= 1, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
