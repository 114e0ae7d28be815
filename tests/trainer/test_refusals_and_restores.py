"""What FeedbackTrainer refuses, and that a refused or interrupted step restores every block:
feedback buffers aliasing parameters, Ctrl-C, memory budgets, a cast after the forward pass, an
empty batch, finite explosions and settings that overflow."""

import os
import signal
import threading

import pytest
import torch
from torch import nn

import dtp_ext


def test_trainer_refuses_feedback_buffers_that_alias_parameters():
    """The reference code's tied initialisation shares storage between W and V."""
    model = nn.Sequential(
        nn.Conv2d(3, 3, 1), dtp_ext.Conv2d(3, 3, 3, padding=1), dtp_ext.Conv2d(3, 3, 3, padding=1)
    )
    model[2].feedback_weight = model[1].weight.data  # another block's forward weight
    trainer = dtp_ext.FeedbackTrainer(model, 2, 0.1, 0.1)
    model(torch.randn(2, 3, 6, 6))
    before = model[1].weight.detach().clone()
    with pytest.raises(
        ValueError,
        match=r"block '2'.s feedback_weight shares memory with the model's "
        r"parameter '1.weight'",
    ):
        trainer.step()
    assert torch.equal(model[1].weight, before)


def test_an_interrupted_trainer_step_restores_every_block():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), dtp_ext.Linear(8, 8, activation="tanh"), dtp_ext.Linear(8, 3)
    )
    trainer = dtp_ext.FeedbackTrainer(model, iterations=[5, 10**8], noise_std=0.1, lr=1e-3)
    model(torch.randn(2, 4))
    before = [b.feedback_weight.clone() for _, b in dtp_ext.dtp_blocks(model)]
    # Ctrl-C's usual handler, even under a runner that started with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.step()
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    for a, (_, b) in zip(before, dtp_ext.dtp_blocks(model)):
        assert torch.equal(a, b.feedback_weight)
    assert trainer.steps == 0


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 1),
        dtp_ext.Conv2d(4, 4, 3, padding=1, activation="elu", pool=2),
        nn.Flatten(),
        dtp_ext.Linear(16, 3),
    )


@pytest.mark.parametrize("budget", [float("inf"), float("nan"), 0, -1, "256"])
def test_memory_budget_must_be_finite(budget):
    with pytest.raises(ValueError, match="memory_budget_mb must be a finite number > 0"):
        dtp_ext.FeedbackTrainer(small_model(), 1, 0.1, 0.1, memory_budget_mb=budget)


@pytest.mark.parametrize("budget", [1e300, 1e303, 1.7e308])
def test_huge_memory_budget_runs(budget):
    """Any finite budget works, up to the largest float (its byte count overflows float64)."""
    model = small_model()
    trainer = dtp_ext.FeedbackTrainer(model, 3, 0.1, 1e-3, memory_budget_mb=budget)
    model(torch.randn(2, 3, 4, 4))
    trainer.step()


def test_cast_after_forward_and_empty_batch_are_explained():
    model = small_model()
    trainer = dtp_ext.FeedbackTrainer(model, 1, 0.1, 0.1)
    model(torch.randn(2, 3, 4, 4))
    model.double()
    with pytest.raises(
        RuntimeError,
        match=r"block '1' recorded its input as torch.float32 on cpu, but "
        r"its weights are now torch.float64",
    ):
        trainer.step()
    model(torch.randn(0, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"block '1' recorded an empty batch"):
        trainer.step()


def test_finite_explosion_is_refused_and_restored():
    model = small_model()
    trainer = dtp_ext.FeedbackTrainer(model, iterations=[3, 2], noise_std=1.0, lr=[10.0, 1e-3])
    model(torch.randn(4, 3, 4, 4))
    before = [b.feedback_weight.clone() for _, b in dtp_ext.dtp_blocks(model)]
    with pytest.raises(
        FloatingPointError,
        match=r"block '1' diverged: its feedback weight's norm grew .* times in one step",
    ):
        trainer.step()
    for a, (_, b) in zip(before, dtp_ext.dtp_blocks(model)):
        assert torch.equal(a, b.feedback_weight)
    # The same step without the bound keeps finite (huge) weights: the guard is what refused it.
    unbounded = dtp_ext.FeedbackTrainer(
        model, iterations=[3, 2], noise_std=1.0, lr=[10.0, 1e-3], max_growth=None
    )
    unbounded.step()
    assert torch.isfinite(model[1].feedback_weight).all()
    assert model[1].feedback_weight.norm() > 100 * before[0].norm()


@pytest.mark.parametrize(
    "build, says",
    [
        (
            lambda m: dtp_ext.FeedbackTrainer(m, 2**63, 0.1, 1e-3),
            "iterations entries must be at most",
        ),
        (lambda m: dtp_ext.Linear(3, 2, beta=1e308), "beta must be a number in"),
    ],
    ids=["iterations", "beta"],
)
def test_finite_but_overflowing_library_settings_are_refused(build, says):
    model = nn.Sequential(dtp_ext.Linear(3, 2))
    with pytest.raises(ValueError, match=says):
        build(model)
