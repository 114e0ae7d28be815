"""What every training algorithm provides to the training loop.

`train_step` fills the forward parameters' .grad (the loop owns the optimizer and steps it) and
does the algorithm's feedback training for the batch, in the order the algorithm prescribes.
During the first `feedback.feedback_only_steps` steps it trains the feedback weights only and
leaves every .grad None, so the loop's optimizer step changes no forward weight.
`update_directions` returns, without side effects, the weight update direction each block would
get on a batch: compared with backprop's gradient, it gives the per-layer GMP angle (docs/maths.md §12).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dtp_ext.nn import dtp_blocks
from dtp_ext.reference import layer_loss_gradients

from ..chain import forward_records
from ..precision import Precision


@dataclass
class FeedbackSettings:
    """Per trained block (every DTP block but the first, forward order)."""

    # None: planned per block by FeedbackTrainer (ldrl; dtp_ext.alignment)
    iterations: list[int] | None
    noise: list[float] | None
    lr: list[float] | None
    momentum: float = 0.9
    warmup_steps: int = 0
    warmup_factor: int = 1
    sync: str | None = None  # FeedbackTrainer's sync under several processes (ldrl)
    memory_budget_mb: float = 256.0  # caps batching F(x + eps) across iterations (docs/memory.md)
    feedback_only_steps: int = 0  # the first N steps train the feedback weights only

    def iterations_at(self, step: int) -> list[int] | None:
        if self.iterations is None:
            return None
        factor = self.warmup_factor if step < self.warmup_steps else 1
        return [k * factor for k in self.iterations]

    def feedback_only(self, step: int) -> bool:
        """Whether step `step` (0-based, counted over the whole run) trains only the feedback
        weights: forward pass and feedback iterations, no forward-weight gradient."""
        return step < self.feedback_only_steps


class Algorithm:
    name = "?"
    has_feedback_weights = (
        True  # whether the blocks' V are meant to align with W (docs/maths.md §12)
    )
    epoch = 0  # set by the training loop at the start of every epoch
    precision = Precision("fp32", "cpu")  # bp, ldrl: --precision's, set by use_precision

    def __init__(self, model: nn.Module, feedback: FeedbackSettings, input_shape, classes: int):
        self.model = model
        self.feedback = feedback
        self.blocks = dtp_blocks(model)
        self.trained = self.blocks[1:]
        self.last_feedback_losses: dict[str, float] = {}
        # Per trained block, after the latest step (restored from a checkpoint for the logs).
        self.last_feedback_quality: dict[str, dict] = {}

    def feedback_quality(self) -> dict[str, dict]:
        """Per trained block, how its feedback weight stands against its predicted floor after
        the latest step (FeedbackReport.alignment; {} for algorithms without one)."""
        return self.last_feedback_quality

    def use_precision(self, precision) -> None:
        """--precision: the forward pass runs under `precision.autocast()`, the backward through
        `precision.backward` (bp and ldrl; config.MIXED_PRECISION_ALGORITHMS)."""
        self.precision = precision

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (batch-mean cross-entropy, logits), both detached."""
        raise NotImplementedError

    def update_directions(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def feedback_state(self) -> list[torch.Tensor]:
        """Every tensor the feedback phase trains, in a fixed order: the trained blocks' feedback
        weights and biases, then the momentum buffers of the algorithm's own feedback SGD
        (`self.sgd`, if any). Under several processes the training loop averages them across
        ranks after each feedback phase (distributed.py); L-DRL's FeedbackTrainer, which holds
        its own momentum, synchronises inside its step instead."""
        tensors = [t for _, b in self.trained for t in (b.feedback_weight, b.feedback_bias)]
        sgd = getattr(self, "sgd", None)
        if sgd is not None:
            tensors += [sgd.buffers[k] for k in sorted(sgd.buffers)]
        return tensors

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


def fused_update_directions(model: nn.Module, blocks, x, y) -> list[torch.Tensor]:
    """Weight gradients through the DTP blocks' own backward (difference targets, docs/maths.md §3).
    Eval mode, so the inputs recorded for the feedback phase are left alone."""
    was_training = model.training
    model.eval()
    try:
        loss = F.cross_entropy(model(x), y)
        return list(torch.autograd.grad(loss, [b.weight for _, b in blocks]))
    finally:
        model.train(was_training)


def target_update_directions(algorithm, x, y) -> list[torch.Tensor]:
    """Update directions of an algorithm that builds explicit targets (`_targets`) on the
    block records: the gradients of its layer-local losses, without side effects."""
    logits, records = forward_records(algorithm.model, x)
    grads = layer_loss_gradients(
        records, algorithm._targets(logits, y, records), records[-1].block.beta
    )
    return [g for g, _ in grads]
