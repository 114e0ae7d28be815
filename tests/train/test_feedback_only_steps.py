"""--feedback-only-steps: the first N steps train the feedback weights only, count as steps,
and resume bitwise."""

import json

import pytest
import torch

from dtp_ext.cli import main
from dtp_ext.train import distributed
from dtp_ext.train.catalog import build_model
from tests.helpers.tiny_runs import tiny_args

TINY = [*tiny_args(), "--feedback-iterations", "3"]


def train(*argv):
    return main(["train", *argv])


def checkpoint(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)


def initial_model(seed=0):
    distributed.seed_all(seed)  # what the run does before building its model
    return build_model("mnist-convnet", 1, 28, 10, 0.7).state_dict()


@pytest.mark.parametrize("algorithm", ["ldrl", "dtp", "tp", "drl"])
@pytest.mark.integration
def test_feedback_only_steps_leave_forward_weights_alone(tmp_path, algorithm):
    out = tmp_path / algorithm
    assert (
        train(
            "--algorithm",
            algorithm,
            "--feedback-only-steps",
            "2",
            "--max-steps",
            "2",
            "--out",
            str(out),
            *TINY,
        )
        == 0
    )
    state = checkpoint(out)
    assert state["global_step"] == 2 and state["optimizer"]["state"] == {}
    initial = initial_model()
    forward = [k for k in initial if not k.startswith("feedback", k.rfind(".") + 1)]
    assert forward and all(torch.equal(state["model"][k], initial[k]) for k in forward)
    if algorithm == "drl":  # DRL trains its own Q, not the blocks' feedback buffers
        assert state["algorithm"]["sgd"]
    else:
        assert not torch.equal(
            state["model"]["conv2.feedback_weight"], initial["conv2.feedback_weight"]
        )
    # Afterwards the forward weights learn: one more step changes them.
    assert (
        train("--resume", "--out", str(out), "--max-steps", "3", "--no-progress", "--threads", "1")
        == 0
    )
    after = checkpoint(out)["model"]
    assert all(not torch.equal(after[k], initial[k]) for k in forward)


@pytest.mark.integration
def test_feedback_only_steps_resume_bitwise(tmp_path):
    common = ["--feedback-only-steps", "4", "--epochs", "2", *TINY]  # 3 steps per epoch
    assert train(*common, "--out", str(tmp_path / "a")) == 0
    assert (
        train(*common, "--out", str(tmp_path / "b"), "--max-steps", "2") == 0
    )  # inside the warm-up
    assert train("--resume", "--out", str(tmp_path / "b"), "--no-progress", "--threads", "1") == 0
    a, b = checkpoint(tmp_path / "a"), checkpoint(tmp_path / "b")
    assert a["global_step"] == b["global_step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["config"]["feedback_only_steps"] == 4


@pytest.mark.integration
def test_feedback_only_steps_change_the_run(tmp_path):
    """The option reaches the algorithm: with 1 feedback-only step, step 1 moves no forward
    weight, without it step 1 does."""
    for n in ("0", "1"):
        assert (
            train("--feedback-only-steps", n, "--max-steps", "1", "--out", str(tmp_path / n), *TINY)
            == 0
        )
    initial = initial_model()
    assert not torch.equal(checkpoint(tmp_path / "0")["model"]["fc.weight"], initial["fc.weight"])
    assert torch.equal(checkpoint(tmp_path / "1")["model"]["fc.weight"], initial["fc.weight"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--feedback-only-steps", "-1"], "feedback_only_steps must be >= 0"),
        (["--feedback-only-steps", "2", "--algorithm", "bp"], "bp has none"),
    ],
)
def test_feedback_only_steps_validated(tmp_path, capsys, argv, message):
    assert train(*argv, "--out", str(tmp_path / "r"), *TINY) == 2
    assert message in capsys.readouterr().err
