"""Short runs log and plot too. steps.jsonl gets a line every --log-every
steps (loss, accuracy, feedback loss per block, alignment), the plots are drawn against
optimizer steps, metrics.jsonl is not left empty, and the run's last line lists only the files
that exist."""

import json
import math
import re

import matplotlib.pyplot as plt
import pytest
import torch

from dtp_ext.cli import main
from dtp_ext.train import plots
from dtp_ext.train.events import event_files
from tests.helpers.tiny_runs import tiny_args

pytestmark = pytest.mark.integration  # every test runs `dtp-ext train` end to end

SIX = tiny_args(192)  # 6 steps per epoch


def lines(out, name="steps.jsonl"):
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def listed_files(printed, out):
    found = re.search(rf"wrote in {re.escape(str(out))}: (.*)", printed)
    assert found, printed
    return found.group(1).split(", ")


def test_a_max_steps_run_logs_every_step_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SIX, "--max-steps", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    records = lines(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # default: every step for a 4-step run
    for r in records:
        assert r["steps"] == 1 and r["epoch"] == 1 and math.isfinite(r["train_loss"])
        assert 0 <= r["train_top1"] <= 100 and set(r["feedback_loss"]) == {"conv2", "fc"}
        # Feedback quality per trained block: |V|/|W| against its predicted floor's 1/cos.
        assert set(r["feedback_quality"]) == {"conv2", "fc"}
        for q in r["feedback_quality"].values():
            assert q["status"] in ("ok", "settling", "unstable") and q["iterations"] == 20
            assert q["raw_norm_ratio"] > 0 and q["predicted_norm_ratio"] >= 1
            assert 0 <= q["angle"] <= 180 and 0 <= q["predicted_angle"] <= 90
        assert set(r["weight_angle"]) == {"conv2", "fc"} and set(r["update_angle"]) == {
            "conv1",
            "conv2",
            "fc",
        }
    assert not (out / "metrics.jsonl").exists()  # no epoch completed: no (empty) epoch log
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "alignment.png").stat().st_size > 0
    files = listed_files(printed, out)
    [events] = event_files(out)  # TensorBoard's (tests/integrations/test_tensorboard.py)
    assert files == [
        "config.json",
        "steps.jsonl",
        "summary.json",
        "accuracy.png",
        "alignment.png",
        "checkpoint.pt",
        events.name,
    ]
    assert sorted(files) == sorted(p.name for p in out.iterdir())


def test_windows_epochs_and_stops(tmp_path):
    """--log-every 4 over 2 epochs of 6 steps: lines at 1 (the run's first step), 4, 6 (epoch
    end), 8, 12 (epoch end); each averages the steps since the previous one, so the lines of an
    epoch give its train loss. A --max-steps stop adds a "stop" line without restarting the
    window."""
    out = tmp_path / "run"
    assert main(["train", *SIX, "--epochs", "2", "--log-every", "4", "--out", str(out)]) == 0
    records = lines(out)
    assert [(r["step"], r["steps"], r.get("kind")) for r in records] == [
        (1, 1, None),
        (4, 3, None),
        (6, 2, "epoch"),
        (8, 2, None),
        (12, 4, "epoch"),
    ]
    epochs = lines(out, "metrics.jsonl")
    for epoch, part in ((1, records[:3]), (2, records[3:])):
        mean = sum(r["train_loss"] * r["steps"] for r in part) / sum(r["steps"] for r in part)
        assert mean == pytest.approx(epochs[epoch - 1]["train_loss"], rel=1e-9)
        assert (
            part[-1]["update_angle"] == epochs[epoch - 1]["update_angle"]
        )  # measured once at the end
    stopped = tmp_path / "stopped"
    assert (
        main(
            [
                "train",
                *SIX,
                "--epochs",
                "2",
                "--log-every",
                "4",
                "--max-steps",
                "7",
                "--out",
                str(stopped),
            ]
        )
        == 0
    )
    assert main(["train", "--resume", "--out", str(stopped), "--no-progress"]) == 0
    resumed = lines(stopped)
    assert [(r["step"], r["steps"], r.get("kind")) for r in resumed] == [
        (1, 1, None),
        (4, 3, None),
        (6, 2, "epoch"),
        (7, 1, "stop"),
        (8, 2, None),
        (12, 4, "epoch"),
    ]
    strip = lambda r: {k: v for k, v in r.items() if k != "time_s"}  # noqa: E731
    assert [strip(r) for r in resumed if r.get("kind") != "stop"] == [strip(r) for r in records]


def test_plots_are_against_steps(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", *SIX, "--log-every", "2", "--out", str(out)]) == 0  # one epoch
    figures = []
    monkeypatch.setattr(plots.plt, "close", lambda fig: figures.append(fig))
    written = plots.write_plots(lines(out, "metrics.jsonl"), out, "t", steps=lines(out))
    assert written == ["accuracy.png", "alignment.png"]
    accuracy, alignment = figures
    loss_ax, top1_ax = accuracy.axes
    assert loss_ax.get_xlabel() == "optimizer step"
    named = {l.get_label(): l for l in top1_ax.get_lines() if not l.get_label().startswith("_")}
    train, test = named["train"], named["test (epoch end)"]
    assert [list(l.get_xdata()) for l in top1_ax.get_lines() if l not in (train, test)] == [
        [6, 6]
    ]  # epoch end
    # one point per steps.jsonl line (the first step's, then every 2nd), not one per epoch
    assert list(train.get_xdata()) == [1, 2, 4, 6]
    assert list(test.get_xdata()) == [6]
    weight_ax, update_ax = alignment.axes
    layers = [l for l in update_ax.get_lines() if not l.get_label().startswith("_")]
    assert [l.get_label() for l in layers] == ["conv1", "conv2", "fc"]
    assert all(list(l.get_xdata()) == [1, 2, 4, 6] for l in layers)
    monkeypatch.undo()
    for fig in figures:
        plt.close(fig)
    assert plots.write_plots([], out, "t", steps=[]) == []


def test_overwrite_removes_what_an_earlier_run_left(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SIX, "--algorithm", "bp", "--out", str(out)]) == 0
    assert (out / "metrics.jsonl").exists()
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                *SIX,
                "--algorithm",
                "bp",
                "--max-steps",
                "1",
                "--out",
                str(out),
                "--overwrite",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert not (out / "metrics.jsonl").exists()  # the earlier run's, gone with the rest
    assert [r["step"] for r in lines(out)] == [1]
    [events] = event_files(out)  # the earlier run's are gone too
    assert listed_files(printed, out) == [
        "config.json",
        "steps.jsonl",
        "summary.json",
        "accuracy.png",
        "alignment.png",
        "checkpoint.pt",
        events.name,
    ]


@pytest.mark.parametrize("algorithm", ["ldrl", "dtp", "tp", "drl"])
def test_measuring_at_a_stop_changes_nothing(tmp_path, algorithm):
    """The alignment measured for a "stop" line (a step no uninterrupted run measures at) has
    no side effect: stopped at step 2 and resumed equals 6 uninterrupted steps, bitwise."""
    common = [
        "--algorithm",
        algorithm,
        "--epochs",
        "2",
        "--log-every",
        "1000",
        "--feedback-iterations",
        "3",
        *tiny_args(test=32, eval=None),
    ]
    assert main(["train", *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["train", *common, "--max-steps", "2", "--out", str(tmp_path / "b")]) == 0
    assert [(r["step"], r.get("kind")) for r in lines(tmp_path / "b")] == [(1, None), (2, "stop")]
    assert main(["train", "--resume", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in "ab")
    assert a["global_step"] == b["global_step"] == 6
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
