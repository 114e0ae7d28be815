"""TensorBoard: `dtp_ext.log_feedback_report` writes a FeedbackReport in one line, and
`dtp-ext train` writes its JSONL records as event files beside them (read back here with
tensorboard's EventAccumulator), rebuilt on --resume so that they match the JSONL; a run
without tensorboard says so once and trains as before. The run folder has config.json and
the first steps.jsonl line from the start."""

import json
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import dtp_ext
from dtp_ext.cli import main
from dtp_ext.train import ConfigError, TrainConfig, runner
from dtp_ext.train.config import validate
from dtp_ext.train.events import event_files
from tests.helpers.tiny_runs import tiny_args

SIX = tiny_args(192)  # 6 steps per epoch


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in `folder`: tag -> [(step, value)] as TensorBoard
    reads them (all of them, no sampling)."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def f32(value) -> float:
    """A value as an event file stores it (float32)."""
    return float(np.float32(value))


def lines(out, name="steps.jsonl"):
    path = out / name
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def expected(out) -> dict[str, list[tuple[int, float]]]:
    """The scalars the JSONL of run folder `out` says its event files hold."""
    want = defaultdict(list)
    merged = sorted(
        [(r["step"], 0, i, r) for i, r in enumerate(lines(out, "metrics.jsonl"))]
        + [(r["step"], 1, i, r) for i, r in enumerate(lines(out))]
    )
    for step, kind, _, r in merged:
        add = lambda tag, value: want[tag].append((step, f32(value)))  # noqa: E731,B023
        if kind == 0:  # metrics.jsonl
            for m in ("loss", "top1", "top5"):
                add(f"test/{m}", r[f"test_{m}"])
                add(f"train_epoch/{m}", r[f"train_{m}"])
            continue
        for m in ("loss", "top1", "top5"):
            add(f"train/{m}", r[f"train_{m}"])
        add("lr/forward", r["lr"])
        for block, loss in r["feedback_loss"].items():
            add(f"feedback_loss/{block}", loss)
        for block, row in r["feedback_quality"].items():
            add(f"lr/feedback/{block}", row["lr"])
            for measure, value in row.items():
                if measure not in ("lr", "status"):
                    add(f"feedback_quality/{block}/{measure}", value)
        for key in ("update_angle", "weight_angle", "weight_distance"):
            for block, value in r[key].items():
                add(f"{key}/{block}", value)
    return dict(want)


# -- the library's one-liner ---------------------------------------------------------------
def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(
        dtp_ext.Linear(8, 16, activation="elu"),
        dtp_ext.Linear(16, 12, activation="elu"),
        dtp_ext.Linear(12, 4),
    )


def test_log_feedback_report_writes_what_the_report_says(tmp_path):
    model = tiny_model()
    trainer = dtp_ext.FeedbackTrainer(model, iterations=3)
    writer = SummaryWriter(log_dir=str(tmp_path))
    reports = []
    for step in range(3):
        model(torch.randn(5, 8))
        report = trainer.step()
        dtp_ext.log_feedback_report(writer, report, step)
        reports.append(report)
    writer.close()
    found = scalars(tmp_path)
    blocks = ["1", "2"]  # the trained blocks: every DTP block after the first
    assert sorted(reports[0].final_losses()) == blocks
    measures = [
        "angle",
        "norm_ratio",
        "raw_angle",
        "raw_norm_ratio",
        "predicted_angle",
        "predicted_norm_ratio",
    ]
    assert sorted(found) == sorted(
        [f"feedback_loss/{b}" for b in blocks]
        + [f"feedback_quality/{b}/{m}" for b in blocks for m in measures]
    )
    for b in blocks:
        assert found[f"feedback_loss/{b}"] == [
            (s, f32(r.final_losses()[b])) for s, r in enumerate(reports)
        ]
        for m in measures:
            assert found[f"feedback_quality/{b}/{m}"] == [
                (s, f32(r.alignment()[b][m])) for s, r in enumerate(reports)
            ]
    # the feedback weights did train: the three steps' losses are not all the same
    assert len({v for _, v in found["feedback_loss/2"]}) > 1


class Recorder:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))


def test_log_feedback_report_refuses_bad_arguments_by_name():
    model = tiny_model()
    trainer = dtp_ext.FeedbackTrainer(model, iterations=2)
    model(torch.randn(5, 8))
    report = trainer.step()
    with pytest.raises(TypeError, match="writer must have an add_scalar method"):
        dtp_ext.log_feedback_report(object(), report, 0)
    with pytest.raises(TypeError, match="report must be the FeedbackReport .* got dict"):
        dtp_ext.log_feedback_report(Recorder(), {"fc": 1.0}, 0)
    for step in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="step must be a whole number >= 0"):
            dtp_ext.log_feedback_report(Recorder(), report, step)
    recorder = Recorder()
    dtp_ext.log_feedback_report(recorder, report, np.int64(4))  # numpy's integers are steps too
    assert recorder.calls and all(step == 4 and type(step) is int for *_, step in recorder.calls)


def test_import_dtp_ext_does_not_import_tensorboard():
    code = (
        "import sys, dtp_ext; "
        "loaded = [m for m in sys.modules if m.split('.')[0] == 'tensorboard' "
        "or m.startswith('torch.utils.tensorboard')]; "
        "assert not loaded, loaded; "
        "assert callable(dtp_ext.log_feedback_report)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- dtp-ext train ---------------------------------------------------------------------------
@pytest.mark.integration
def test_a_run_writes_its_jsonl_as_tensorboard_scalars(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SIX, "--epochs", "2", "--log-every", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    [event_file] = event_files(out)
    assert f", {event_file.name}" in printed  # listed with the files the run wrote
    found = scalars(out)
    assert found == expected(out)
    steps = [1, 4, 6, 8, 12]  # the first step, every 4th, the epochs' ends
    assert [s for s, _ in found["train/loss"]] == steps
    assert [s for s, _ in found["update_angle/conv1"]] == steps
    assert [s for s, _ in found["test/top1"]] == [6, 12]
    assert found["lr/feedback/fc"] == [(s, f32(0.18)) for s in steps]  # MNIST's planned fc lr
    assert found["test/top1"][-1][1] == f32(lines(out, "metrics.jsonl")[-1]["test_top1"])


@pytest.mark.integration
def test_a_resumed_run_rebuilds_its_events_from_the_kept_jsonl(tmp_path):
    out = tmp_path / "run"
    args = [*SIX, "--epochs", "2", "--log-every", "4", "--out", str(out)]
    assert main(["train", *args, "--max-steps", "7"]) == 0
    # A run killed after writing step 8's line, before its checkpoint: in steps.jsonl and in an
    # event file, both past the checkpoint (step 7).
    extra = {**lines(out)[-1], "step": 8, "train_loss": 99.0}
    del extra["kind"]
    with open(out / "steps.jsonl", "a") as f:
        f.write(json.dumps(extra) + "\n")
    writer = SummaryWriter(log_dir=str(out), filename_suffix=".crashed")
    writer.add_scalar("train/loss", 99.0, 8)
    writer.close()
    assert len(event_files(out)) == 2
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert len(event_files(out)) == 1
    found = scalars(out)
    assert found == expected(out)
    assert [(s, v == f32(99.0)) for s, v in found["train/loss"]] == [
        (1, False),
        (4, False),
        (6, False),
        (7, False),  # the stop line
        (8, False),  # step 8 trained again, not the dropped line's
        (12, False),
    ]
    # the same scalars as an uninterrupted run, besides the stop line's (times aside)
    whole = tmp_path / "whole"
    assert main(["train", *SIX, "--epochs", "2", "--log-every", "4", "--out", str(whole)]) == 0
    drop_stop = lambda pairs: [(s, v) for s, v in pairs if s != 7]  # noqa: E731
    uninterrupted = scalars(whole)
    assert sorted(found) == sorted(uninterrupted)
    for tag in ("train/loss", "test/top1", "update_angle/conv2", "feedback_loss/fc"):
        assert drop_stop(found[tag]) == uninterrupted[tag], tag


@pytest.mark.integration
def test_without_tensorboard_a_run_says_so_once_and_trains(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises
    out = tmp_path / "run"
    assert main(["train", *SIX, "--max-steps", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("tensorboard is not installed") == 1
    assert "--no-tensorboard" in printed
    assert event_files(out) == [] and [r["step"] for r in lines(out)] == [1, 2, 3]
    # --no-tensorboard: no event files and nothing said, with tensorboard missing too

    quiet = tmp_path / "quiet"
    assert main(["train", *SIX, "--max-steps", "1", "--no-tensorboard", "--out", str(quiet)]) == 0
    assert "tensorboard is not installed" not in capsys.readouterr().out
    assert (
        event_files(quiet) == []
        and json.loads((quiet / "config.json").read_text())["tensorboard"] is False
    )


@pytest.mark.integration
def test_event_files_of_an_earlier_run_need_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    writer = SummaryWriter(log_dir=str(out))
    writer.add_scalar("train/loss", 5.0, 1)
    writer.close()
    [old] = event_files(out)
    assert main(["train", *SIX, "--max-steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert old.name in err and "--overwrite" in err and err.count("\n") == 1
    assert event_files(out) == [old] and not (out / "config.json").exists()
    assert main(["train", *SIX, "--max-steps", "1", "--out", str(out), "--overwrite"]) == 0
    [new] = event_files(out)
    assert new != old and scalars(out)["train/loss"] == [(1, f32(lines(out)[0]["train_loss"]))]


def test_the_tensorboard_option_must_be_true_or_false():
    validate(TrainConfig(tensorboard=False))
    with pytest.raises(ConfigError, match="tensorboard must be true or false, got 'no'"):
        validate(TrainConfig(tensorboard="no"))


# -- the first files ------------------------------------------------------------------------
@pytest.mark.integration
def test_config_events_and_the_first_line_come_at_the_start(tmp_path, monkeypatch):
    """Before the first step the folder holds config.json and the event file; the first
    step's steps.jsonl line is there before the second step starts."""
    seen = []
    train_step = runner.Run._train_step

    def watched(self, *args):
        names = sorted(p.name for p in self.out.iterdir())
        seen.append((self.global_step, names, [r["step"] for r in lines(self.out)]))
        return train_step(self, *args)

    monkeypatch.setattr(runner.Run, "_train_step", watched)
    out = tmp_path / "run"
    assert main(["train", *SIX, "--log-every", "50", "--out", str(out)]) == 0
    (before_first, names, logged), (before_second, _, logged_then) = seen[:2]
    assert before_first == 0 and before_second == 1
    [event_file] = event_files(out)
    assert names == [".lock", "config.json", event_file.name] and logged == []
    assert logged_then == [1]  # the first step's line, written at once
    assert [r["step"] for r in lines(out)] == [1, 6]  # then --log-every 50: the epoch's end
    config = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert config == summary["config"] and config["log_every"] == 50


@pytest.mark.integration
def test_config_json_repeats_the_run_and_a_resume_rewrites_it(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *SIX, "--max-steps", "2", "--algorithm", "bp", "--out", str(out)]) == 0
    first = json.loads((out / "config.json").read_text())
    assert first["algorithm"] == "bp" and first["max_steps"] == 2 and first["epochs"] == 1
    # --config OUT/config.json: the same resolved configuration, another folder
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / "config.json"), "--out", str(again)]) == 0
    assert json.loads((again / "config.json").read_text()) == {**first, "out": str(again)}
    assert [(r["step"], r["train_loss"]) for r in lines(again)] == [
        (r["step"], r["train_loss"]) for r in lines(out)
    ]
    # --resume with a larger --epochs: config.json says what the run now trains to
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2", "--no-progress"]) == 0
    resumed = json.loads((out / "config.json").read_text())
    assert resumed == {**first, "epochs": 2, "max_steps": None}
