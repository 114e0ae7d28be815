"""--max-steps counts the run's steps from its start, in every invocation;
a resumed run says from which step it continues and when there is nothing left to do (then it
rewrites nothing); resuming with another --threads is accepted with a note that the result is
not bitwise that of an uninterrupted run."""

import json
from pathlib import Path

import pytest
import torch

from dtp_ext.cli import main
from tests.helpers.paths import REPO
from tests.helpers.tiny_runs import tiny_args

TINY = ["--algorithm", "bp", *tiny_args()]  # 3 steps per epoch


def resume(out, capsys, *extra):
    code = main(["train", "--resume", "--out", str(out), "--no-progress", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def snapshot(out: Path):
    return {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.integration
def test_max_steps_is_a_total_and_resume_says_where_it_stands(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--max-steps", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    before = snapshot(out)
    printed = resume(out, capsys, "--max-steps", "2")
    assert "resumed from step 2 (epoch 1, 2 of its 3 steps done)" in printed
    assert (
        "nothing left to do: the run is at step 2 and --max-steps 2 counts the run's steps from its "
        "start, not this invocation's"
    ) in printed
    assert "nothing was rewritten" in printed and "test accuracy" not in printed
    assert snapshot(out) == before  # summary.json, checkpoint, logs: untouched

    printed = resume(out, capsys, "--max-steps", "4")  # 4 in total, not 2 + 4
    assert "resumed from step 2 " in printed and "after 4 steps" in printed
    assert json.loads((out / "summary.json").read_text())["global_step"] == 4

    printed = resume(out, capsys)  # no --max-steps: to the last epoch
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 6 and summary["finished"]

    before = snapshot(out)
    for extra in ([], ["--epochs", "1"], ["--max-steps", "5"]):
        printed = resume(out, capsys, *extra)
        assert (
            "resumed from step 6 (2 of " in printed
            and "nothing left to do: the run has completed 2 epoch(s)" in printed
        )
    assert snapshot(out) == before


@pytest.mark.integration
def test_nothing_left_but_no_summary_yet(tmp_path, capsys):
    """A run stopped before its final evaluation (a signal there) gets its summary on --resume,
    without training a step."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--max-steps", "2", "--out", str(out)]) == 0
    checkpoint = (out / "checkpoint.pt").read_bytes()
    (out / "summary.json").unlink()
    printed = resume(out, capsys, "--max-steps", "2")
    assert "nothing left to do" in printed and "test accuracy" in printed
    assert json.loads((out / "summary.json").read_text())["global_step"] == 2
    assert (out / "checkpoint.pt").read_bytes() == checkpoint


@pytest.mark.integration
def test_resume_with_other_threads_is_noted(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        assert main(["train", *TINY, "--max-steps", "1", "--out", str(out)]) == 0
        capsys.readouterr()
        printed = resume(out, capsys, "--max-steps", "2", "--threads", "2")
        assert (
            "note: the checkpoint was written with 1 CPU thread(s), this run uses 2: it continues, but is not "
            "bitwise identical to an uninterrupted run"
        ) in printed
        assert "--threads 1 for that" in printed
        printed = resume(
            out, capsys, "--max-steps", "3", "--threads", "2"
        )  # written with 2 this time
        assert "note: the checkpoint was written" not in printed
        assert "resumed from step 2 " in printed
    finally:
        torch.set_num_threads(threads)


def test_help_and_docs_say_total(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "stop once the run has N optimizer steps in total, counted from its start (also with --resume)"
        in help_text
    )
    docs = REPO / "docs" / "training.md"
    if docs.exists():
        text = " ".join(docs.read_text().split())
        assert "applies to one invocation" not in text
        assert "`--max-steps N` stops the run once it has N optimizer steps in total" in text
