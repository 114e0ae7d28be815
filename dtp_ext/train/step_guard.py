"""The refusals of a `dtp-ext train` step: a loss or forward gradient that is not finite on any
rank, or fp16 gradients that overflow step after step, stop the run with TrainingDiverged, its
message saying where and what to change. Every rank reads the same summed totals, so every rank
refuses the same step and none waits on the others."""

from __future__ import annotations

import torch

from .distributed import StepTotals
from .precision import Precision


class TrainingDiverged(RuntimeError):
    pass


def refuse_bad_loss(totals: StepTotals, value: float, cause: str, where: str, lr: float):
    """The loss (`value`, its mean over the ranks) is not finite on some rank; `cause` is why
    the step failed before giving one, or ""."""
    if totals.bad_loss:
        raise TrainingDiverged(
            f"the training loss became {value}{cause} {where}; lower the forward lr (now {lr:g}) "
            "or train the feedback weights longer first (feedback_only_steps, feedback_warmup_steps / "
            "feedback_warmup_factor)"
        )


def refuse_bad_gradients(
    totals: StepTotals,
    named_params: list[tuple[str, torch.Tensor]],
    precision: Precision,
    value: float,
    where: str,
    lr: float,
):
    """A forward gradient is not finite on some rank, and no fp16 loss scaler is there to skip
    the step. The gradients are the reduced ones: every rank names the same."""
    if totals.bad_grad and precision.scaler is None:
        bad = [
            n
            for n, p in named_params
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        raise TrainingDiverged(
            f"a forward gradient became non-finite ({', '.join(bad) or 'on another rank'}) {where} "
            f"while the loss was {value:g}; the step was refused (forward weights and optimizer "
            f"state unchanged); lower the forward lr (now {lr:g}) or the feedback lr"
        )


def refuse_overflows(precision: Precision, limit: int, where: str, lr: float):
    """fp16: GradScaler skipped the step and halved the scale (the batch still counts); `limit`
    such steps in a row stop the run."""
    if precision.consecutive_overflows >= limit:
        raise TrainingDiverged(
            f"fp16: the scaled gradients overflowed {limit} steps in a row "
            f"{where} (loss scale now {precision.scaler.get_scale():g}); the forward "
            f"weights are unchanged since; train with --precision bf16 or fp32, or lower "
            f"the forward lr (now {lr:g})"
        )
