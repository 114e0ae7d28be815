"""Vanilla DTP (Lee et al. 2015) and TP (docs/maths.md §10): feedback trained to invert the block,
mean_b sum ((x + eps) - G(F(x + eps)))^2 with the noisy pass's pool indices.

Training runs through the fused kernel `dtp_ext.ops.reconstruction_feedback_loop` (the whole
K-iteration loop in one call), checked against `dtp_ext.reference.feedback_loop(...,
loss="reconstruction")`; the targets and layer-local gradients are dtp_ext.reference's.

Targets (paper form, docs/maths.md §3): t_N = s_N - beta * grad of the sum-reduced CE, then for the
blocks below, vanilla DTP's t_{n-1} = s_{n-1} + G_n(t_n) - G_n(s_n) and TP's t_{n-1} = G_n(t_n);
layer-local losses 1/2 mean_b |s_n - t_n|^2, their gradients divided by beta (this library's
units).

The last hidden block's target: `penultimate_target` (`--penultimate-target` in the training
command, a constructor option here):

- "feedback" (default: docs/maths.md §10's form): t_{N-1} through the output block's G as every other
  target (vanilla DTP by the DTP blocks' fused backward, as L-DRL).
- "gradient" (Lee et al. 2015's Algorithm 1): t_{N-1} = s_{N-1} - beta * d(sum_b CE)/d s_{N-1},
  one gradient step through the output block. The output block and the last hidden block then
  take backprop's step exactly, and only the targets of the blocks below go through learned
  feedback. The output block's G is still trained, but shapes no target.

Why the second choice exists (the paper's TP collapses on mnist-convnet): docs/baselines.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dtp_ext import ops, reference
from dtp_ext.reference import block_input
from dtp_ext.trainer import chunk_iterations

from ..chain import forward_records
from ..config import PENULTIMATE_TARGETS, check_choice
from .base import Algorithm, fused_update_directions, target_update_directions
from .feedback_sgd import MomentumSGD


class _ReconstructionFeedback(Algorithm):
    penultimate_target = "feedback"
    difference = True

    def __init__(
        self, model, feedback, input_shape, classes, *, penultimate_target: str | None = None
    ):
        super().__init__(model, feedback, input_shape, classes)
        self.sgd = MomentumSGD(feedback.momentum)
        if penultimate_target is not None:
            self.penultimate_target = penultimate_target
        check_choice("penultimate_target", self.penultimate_target, PENULTIMATE_TARGETS)

    @torch.no_grad()
    def train_feedback(self, inputs, step):
        # With the "gradient" penultimate target the output block's G shapes no target; it is
        # trained all the same (cheap: 10 -> 512 on mnist-convnet), so its alignment is logged
        # and both choices draw the same noise.
        iterations = self.feedback.iterations_at(step)
        for (name, block), x, k, sigma, lr in zip(
            self.trained, inputs, iterations, self.feedback.noise, self.feedback.lr
        ):
            x = block_input(block, x.detach())
            # Zero buffers behave as torch.optim.SGD's first step (buf = grad).
            buf_w = self.sgd.buffers.setdefault(
                f"{name}.weight", torch.zeros_like(block.feedback_weight)
            )
            buf_b = self.sgd.buffers.setdefault(
                f"{name}.bias", torch.zeros_like(block.feedback_bias)
            )
            losses = ops.reconstruction_feedback_loop(
                x,
                block.weight,
                block.bias,
                block.feedback_weight,
                block.feedback_bias,
                buf_w,
                buf_b,
                k,
                sigma,
                lr,
                self.sgd.momentum,
                0.0,
                chunk_iterations(block, x, self.feedback.memory_budget_mb),
                block.geometry(),
            )
            self.last_feedback_losses[name] = float(losses[-1]) if k else float("nan")

    def _targets(self, logits, y, records) -> list[torch.Tensor]:
        return reference.targets(
            logits,
            y,
            records,
            records[-1].block.beta,
            difference=self.difference,
            penultimate=self.penultimate_target,
        )

    def _explicit_train_step(self, x, y, step):
        """Block by block: forward, feedback training, then the targets with the fresh feedback
        weights and the layer-local losses' gradients (docs/maths.md §4's order)."""
        logits, records = forward_records(self.model, x)
        self.train_feedback([r.input for r in records[1:]], step)
        if not self.feedback.feedback_only(step):
            reference.layer_loss_gradients(
                records, self._targets(logits, y, records), records[-1].block.beta, accumulate=True
            )
        return F.cross_entropy(logits.detach(), y), logits.detach()

    def state_dict(self):
        return {"sgd": self.sgd.state_dict()}

    def load_state_dict(self, state):
        self.sgd.load_state_dict(state["sgd"], self.blocks[0][1].weight.device)


class VanillaDTP(_ReconstructionFeedback):
    name = "dtp"
    difference = True

    def train_step(self, x, y, step):
        if self.penultimate_target == "gradient":
            return self._explicit_train_step(x, y, step)
        # the paper's form: every target through the DTP blocks' fused backward.
        self.model.train()
        logits = self.model(x)
        self.train_feedback([b.recorded_input for _, b in self.trained], step)
        loss = F.cross_entropy(logits, y)
        if not self.feedback.feedback_only(step):
            loss.backward()
        return loss.detach(), logits.detach()

    def update_directions(self, x, y):
        if self.penultimate_target == "gradient":
            return target_update_directions(self, x, y)
        return fused_update_directions(self.model, self.blocks, x, y)


class TargetProp(_ReconstructionFeedback):
    name = "tp"
    difference = False

    def train_step(self, x, y, step):
        return self._explicit_train_step(x, y, step)

    def update_directions(self, x, y):
        return target_update_directions(self, x, y)
