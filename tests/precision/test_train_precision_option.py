"""`dtp-ext train --precision fp32|bf16|fp16`.

bf16: the forward pass under autocast, the feedback phase in bfloat16 (float32 masters); fp16:
the same in float16 plus a GradScaler whose scale reaches the DTP blocks through
dtp_ext.loss_scale, overflowing steps skipped (weights untouched) and the scaler's state in the
checkpoint. The one-epoch MNIST comparison against fp32 is in README.md ("Mixed precision")."""

import json

import pytest
import torch

from dtp_ext.cli import main
from dtp_ext.train import ConfigError, TrainConfig, TrainingDiverged, resolve
from tests.helpers.tiny_runs import first_batch, tiny_args, tiny_run

TINY = tiny_args()


def test_bad_precision_and_unsupported_algorithms_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--precision", "fp8"])
    assert "--precision: invalid choice: 'fp8'" in capsys.readouterr().err
    for algorithm in ("dtp", "tp", "drl"):
        with pytest.raises(
            ConfigError,
            match=f"precision 'bf16' applies to bp and ldrl only; {algorithm} trains in fp32",
        ):
            resolve(TrainConfig(algorithm=algorithm, precision="bf16"))


def test_bf16_ldrl_runs_its_forward_and_feedback_phase_in_bfloat16(tmp_path, monkeypatch):
    run = tiny_run(tmp_path, "ldrl", precision="bf16")
    trainer = run.algorithm.trainer
    assert trainer.compute_dtype == torch.bfloat16
    seen = {}
    inner = trainer.step

    def spy():
        # what the blocks recorded in the forward pass the trainer is about to train on
        seen["inputs"] = {name: b.recorded_input.dtype for name, b in trainer.blocks}
        return inner()

    monkeypatch.setattr(trainer, "step", spy)
    x, y = first_batch(run)
    run._train_step(x, y)
    assert set(seen["inputs"].values()) == {torch.bfloat16}  # autocast forward
    for _, block in trainer.blocks:  # float32 masters; gradients in the parameters' dtype
        assert block.feedback_weight.dtype == torch.float32
        assert block.weight.dtype == torch.float32
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in run.model.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.integration
def test_short_run_finishes_and_reports_its_precision(tmp_path, capsys, precision):
    out = tmp_path / precision
    assert main(["train", *TINY, "--precision", precision, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["precision"] == precision
    assert summary["precision"]["name"] == precision
    assert (summary["precision"]["loss_scale"] is None) == (precision == "bf16")
    assert summary["test_accuracy"] > 0 and all(
        torch.isfinite(torch.tensor(v)) for v in summary["alignment"]["update_angle"].values()
    )


@pytest.mark.parametrize("algorithm", ["ldrl", "bp"])
@pytest.mark.integration
def test_fp16_overflow_skips_the_step_and_lowers_the_scale(tmp_path, algorithm):
    """A scale so large that float16 gradients overflow: GradScaler skips those steps (forward
    weights and momentum untouched, the batch counted) and halves the scale until they fit."""
    run = tiny_run(tmp_path, algorithm, precision="fp16")
    x, y = first_batch(run)
    run._train_step(x, y)  # a good step first: the optimizer has momentum
    scaler = run.precision.scaler
    scaler.update(new_scale=2.0**40)
    weights = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    run._train_step(x, y)
    assert run.precision.skipped_steps == 1 and scaler.get_scale() == 2.0**39
    for n, p in run.model.named_parameters():
        assert torch.equal(p, weights[n]), n
    assert run.global_step == 2
    for _ in range(40):
        run._train_step(x, y)
        if run.precision.consecutive_overflows == 0:
            break
    assert run.precision.consecutive_overflows == 0 and scaler.get_scale() < 2.0**39
    assert any(not torch.equal(p, weights[n]) for n, p in run.model.named_parameters())


@pytest.mark.integration
def test_fp16_gives_up_after_overflowing_steps_in_a_row(tmp_path, monkeypatch):
    import dtp_ext.train.runner as runner

    monkeypatch.setattr(runner, "MAX_CONSECUTIVE_OVERFLOWS", 3)
    run = tiny_run(tmp_path, "bp", precision="fp16")
    x, y = first_batch(run)
    run._train_step(x, y)  # the scaler's state exists once it has scaled a loss
    run.precision.scaler.update(new_scale=2.0**100)
    with pytest.raises(
        TrainingDiverged, match="fp16: the scaled gradients overflowed 3 steps in a row"
    ):
        for _ in range(3):
            run._train_step(x, y)


@pytest.mark.integration
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, capsys, precision):
    """The GradScaler's scale and growth tracker travel in the checkpoint."""
    args = ["train", *TINY, "--epochs", "2", "--precision", precision]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main([*args, "--out", str(whole)]) == 0
    assert main([*args, "--max-steps", "4", "--out", str(split)]) == 0
    assert main(["train", "--resume", "--no-progress", "--out", str(split)]) == 0
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (whole, split))
    assert a["global_step"] == b["global_step"] == 6
    assert a["precision"] == b["precision"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_resume_with_another_precision_is_refused(tmp_path, capsys):
    """The GradScaler's state and the feedback phase's dtype belong to the run: --resume
    continues the saved precision and refuses another."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--precision", "bf16", "--max-steps", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    code = main(["train", "--resume", "--precision", "fp16", "--no-progress", "--out", str(out)])
    assert code == 2
    assert "got --precision (saved 'bf16', given 'fp16')" in capsys.readouterr().err
