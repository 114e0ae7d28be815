"""End-to-end runs of `dtp-ext train` on tiny subsets: outputs, resume identity, divergence."""

import json
import math

import pytest
import torch

from dtp_ext.cli import main
from tests.helpers.tiny_runs import tiny_args

TINY = tiny_args()


def train(*argv):
    return main(["train", *argv])


@pytest.mark.integration
def test_default_command_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        train(
            "--max-steps",
            "5",
            "--out",
            str(out),
            "--no-progress",
            "--threads",
            "1",
            "--test-subset",
            "500",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "weight angle" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 5 and not summary["finished"]
    assert 0 <= summary["test_accuracy"] <= 100
    assert (
        summary["config"]["algorithm"] == "ldrl" and summary["config"]["model"] == "mnist-convnet"
    )
    assert summary["build_info"]["dtp_ext_version"] and summary["versions"]["torch"]
    assert set(summary["alignment"]["weight_angle"]) == {"conv2", "fc"}
    assert summary["alignment"]["update_angle"]["fc"] < 1e-3  # output block: exactly backprop
    assert (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("algorithm", ["bp", "ldrl", "dtp", "tp", "drl"])
@pytest.mark.integration
def test_each_algorithm_writes_epoch_logs(tmp_path, algorithm):
    out = tmp_path / algorithm
    assert train("--algorithm", algorithm, "--epochs", "2", "--out", str(out), *TINY) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_loss", "test_loss", "train_top1", "test_top1", "test_top5", "lr", "time_s"):
        assert math.isfinite(records[-1][key])
    assert set(records[-1]["update_angle"]) == {"conv1", "conv2", "fc"}
    if algorithm in ("ldrl", "dtp", "tp"):
        assert set(records[-1]["weight_angle"]) == {"conv2", "fc"}
    assert records[1]["lr"] < records[0]["lr"]  # cosine over the 2 epochs
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "alignment.png").stat().st_size > 0


def _final_state(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)


@pytest.mark.parametrize("algorithm", ["ldrl", "dtp", "drl"])
@pytest.mark.integration
def test_resume_is_bitwise_identical(tmp_path, algorithm):
    common = ["--algorithm", algorithm, "--epochs", "2", *TINY]  # 3 steps per epoch
    assert train(*common, "--out", str(tmp_path / "a")) == 0
    assert train(*common, "--out", str(tmp_path / "b"), "--max-steps", "2") == 0
    assert train("--resume", "--out", str(tmp_path / "b"), "--max-steps", "4", "--no-progress") == 0
    assert train("--resume", "--out", str(tmp_path / "b"), "--no-progress") == 0
    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    assert a["global_step"] == b["global_step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    strip = lambda line: {k: v for k, v in json.loads(line).items() if "time" not in k}  # noqa: E731
    lines_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [strip(x) for x in lines_a] == [strip(x) for x in lines_b]


@pytest.mark.integration
def test_out_with_a_run_needs_resume_or_overwrite(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train("--max-steps", "1", "--out", out, *TINY) == 0
    capsys.readouterr()
    assert train("--max-steps", "1", "--out", out, *TINY) == 2
    assert "--resume" in capsys.readouterr().err
    assert train("--resume", "--out", out, "--lr", "0.5") == 2
    assert "only" in capsys.readouterr().err
    assert train("--max-steps", "1", "--out", out, "--overwrite", *TINY) == 0


@pytest.mark.parametrize(
    "existing", ["config.json", "metrics.jsonl", "steps.jsonl", "summary.json", "accuracy.png"]
)
def test_out_holding_files_a_run_would_write_is_refused_without_overwrite(
    tmp_path, capsys, existing
):
    """No checkpoint, but a file the run would write (the user's, or the only record of a run
    that stopped before its first checkpoint): refused with one line, exit 2, nothing touched."""
    out = tmp_path / "run"
    out.mkdir()
    (out / existing).write_text("precious\n")
    (out / "notes.txt").write_text("mine\n")
    assert train("--max-steps", "1", "--out", str(out), *TINY) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and existing in err and "--overwrite" in err
    assert (out / existing).read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == sorted([existing, "notes.txt"])


@pytest.mark.integration
def test_divergence_stops_with_a_clear_message(tmp_path, capsys):
    assert train("--lr", "100", "--epochs", "10", "--out", str(tmp_path / "r"), *TINY) == 1
    assert "lower the forward lr" in capsys.readouterr().err


@pytest.mark.integration
def test_python_m_entry_point(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import dtp_ext

    # The package this test imported (installed, or an in-place build), not a source tree in cwd.
    env = dict(os.environ, PYTHONPATH=str(Path(dtp_ext.__file__).resolve().parent.parent))
    done = subprocess.run(
        [sys.executable, "-m", "dtp_ext.train", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0 and "--feedback-iterations" in done.stdout, done.stderr


def test_feedback_warmup_multiplies_iterations():
    from dtp_ext.train.algorithms import FeedbackSettings

    s = FeedbackSettings([2, 3], [0.1, 0.1], [0.1, 0.1], warmup_steps=5, warmup_factor=4)
    assert s.iterations_at(4) == [8, 12] and s.iterations_at(5) == [2, 3]


@pytest.mark.slow
@pytest.mark.integration
def test_default_command_reaches_97_percent(tmp_path):
    """The documented default run (one epoch of L-DRL on MNIST, ~3 minutes on 2 cores)."""
    out = tmp_path / "default"
    assert train("--out", str(out), "--no-progress") == 0
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] >= 97.0


@pytest.mark.parametrize("algorithm", ["ldrl", "dtp"])
@pytest.mark.integration
def test_feedback_memory_cap_changes_batching_not_results(tmp_path, algorithm, monkeypatch):
    """--feedback-memory-mb reaches the fused loops (one iteration per chunk at 0.01 MB, all of
    them by default) and, the noise being drawn in the same order, leaves the run bitwise equal."""
    from dtp_ext import trainer as trainer_module

    chunks = []
    original = trainer_module.chunk_iterations
    monkeypatch.setattr(
        trainer_module, "chunk_iterations", lambda *a: chunks.append(original(*a)) or chunks[-1]
    )
    import dtp_ext.train.algorithms.reconstruction as reconstruction

    monkeypatch.setattr(reconstruction, "chunk_iterations", trainer_module.chunk_iterations)
    states = {}
    for cap in ("0.01", None):
        out = tmp_path / f"cap-{cap}"
        chunks.clear()
        argv = [
            "--algorithm",
            algorithm,
            "--max-steps",
            "2",
            "--feedback-iterations",
            "3",
            "--out",
            str(out),
            *TINY,
        ] + (["--feedback-memory-mb", cap] if cap else [])
        assert train(*argv) == 0
        assert chunks and (set(chunks) == {1} if cap else min(chunks) >= 3), chunks
        states[cap] = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    for name, value in states[None].items():
        assert torch.equal(value, states["0.01"][name]), name


@pytest.mark.integration
def test_drl_s_variant_end_to_end(tmp_path):
    """Two epochs of DRL "s": the first trains Q only (the forward weights keep their initial
    values), the second the forward weights only."""
    out = tmp_path / "s"
    assert (
        train(
            "--algorithm",
            "drl",
            "--drl-variant",
            "s",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--feedback-iterations",
            "2",
            "--scheduler",
            "none",
            *TINY,
        )
        == 0
    )
    after_q_epoch = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (
        train("--resume", "--out", str(out), "--epochs", "2", "--no-progress", "--threads", "1")
        == 0
    )
    after_forward_epoch = torch.load(out / "checkpoint.pt", weights_only=False)
    fresh = tmp_path / "fresh"
    assert (
        train(
            "--algorithm",
            "drl",
            "--drl-variant",
            "s",
            "--max-steps",
            "1",
            "--out",
            str(fresh),
            "--feedback-iterations",
            "0",
            "--scheduler",
            "none",
            *TINY,
        )
        == 0
    )
    init = torch.load(fresh / "checkpoint.pt", weights_only=False)["model"]
    for name, value in after_q_epoch["model"].items():
        assert torch.equal(value, init[name]), name  # epoch 1: forward weights untouched
    q_after_1 = after_q_epoch["algorithm"]["Q"]
    assert all(torch.equal(a, b) for a, b in zip(q_after_1, after_forward_epoch["algorithm"]["Q"]))
    assert not torch.equal(after_forward_epoch["model"]["fc.weight"], init["fc.weight"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
