"""Vanilla DTP (Lee et al. 2015) and TP (SPEC §5): feedback trained to invert the block,
mean_b sum ((x + eps) - G(F(x + eps)))^2 with the noisy pass's pool indices.

Training runs through the fused kernel `dtp_ext.ops.reconstruction_feedback_loop` (the whole
K-iteration loop in one call); `train_reconstruction` is the same loop by autograd on
dtp_ext.block_math ops, kept as the reference the tests compare the kernel with.

Targets (paper form, SPEC §3): t_N = s_N - beta * grad of the sum-reduced CE, then for the
blocks below, vanilla DTP's t_{n-1} = s_{n-1} + G_n(t_n) - G_n(s_n) and TP's t_{n-1} = G_n(t_n);
layer-local losses 1/2 mean_b |s_n - t_n|^2, their gradients divided by beta (this library's
units).

The last hidden block's target: `penultimate_target` (`--penultimate-target` in the training
command, a constructor option here):

- "feedback" (default: SPEC §5's form): t_{N-1} through the output block's G as every other
  target (vanilla DTP by the DTP blocks' fused backward, as L-DRL).
- "gradient" (Lee et al. 2015): t_{N-1} = s_{N-1} - beta * d(sum_b CE)/d s_{N-1}, i.e. one
  gradient step through the output block, as in Lee et al. 2015 (their Algorithm 1 makes the
  first target at the last hidden layer by a gradient step on the global loss; only the layers
  below use the learned inverses). The output block and the last hidden block then take
  backprop's step exactly, and only the targets of the blocks below go through learned
  feedback. The output block's G is still trained, but shapes no target.

Why the second choice exists, measured on mnist-convnet (conv1 -> conv2 ->
fc 512 -> 10, MNIST, seed 0, one thread). The output block cannot be inverted: its G sees 10
numbers, and even trained to convergence its reconstruction G(F(s)) misses ~80 % of the 512-dim
conv2 output's per-image variation (conv2's G misses ~54 % of conv1's). SPEC's TP target
G(t) = G(s) + (G(t) - G(s)) is then dominated by the reconstruction error, not by the nudge: at
the first steps |t - s| was 29 for conv1 (|s| 34) and 10 for conv2 (|s| 12), the layer
gradients 10^3 times backprop's; within ~60 steps conv2's per-image variation fell from 6.2 to
0.1-0.2 with 65-80 % of its units saturated at ELU's -1 (a collapsed representation is a fixed
point of TP: it is perfectly reconstructible), conv1's from 24 to 2-4, and the classifier,
though trained with backprop's own gradient, had nothing left to separate: chance accuracy.
DTP's difference correction cancels that error, yet vanilla DTP in SPEC's form was unstable as
well: 93.7 % train top-1 over one epoch but 83.6 % test at its end, and a divergence at step 13
with feedback lr 1e-3/1e-2; with the "gradient" choice it reached 98.5 %. TP's remaining
weakness is conv1: its target still carries conv2's reconstruction error, conv1's updates stay
~85-95° from backprop's and its per-image variation shrinks; presets.py gives the settings that
keep TP stable (90.3 % after one epoch).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from dtp_ext import ops
from dtp_ext.block_math import block_input, feedback_block, forward_block
from dtp_ext.trainer import chunk_iterations

from ..chain import BlockRecord, feedback, first_target, forward_records, layer_loss_gradients
from ..config import PENULTIMATE_TARGETS  # how the last hidden block's target is made; see above
from .base import Algorithm, fused_update_directions, target_update_directions
from .feedback_sgd import MomentumSGD


def reconstruction_loss(block, x, eps, V, c):
    with torch.no_grad():
        y_noisy, indices, pre = forward_block(block, x + eps)
    r = feedback_block(block, y_noisy, indices, pre, x.shape, V, c)
    return ((x + eps - r) ** 2).flatten(1).sum(1).mean()


def train_reconstruction(name, block, x, iterations, sigma, lr, sgd: MomentumSGD) -> float:
    """K SGD steps on the block's feedback buffers, in place; returns the last loss."""
    x = x.detach()
    loss = float("nan")
    for _ in range(iterations):
        eps = torch.randn_like(x) * sigma
        with torch.enable_grad():
            V = block.feedback_weight.detach().requires_grad_(True)
            c = block.feedback_bias.detach().requires_grad_(True)
            value = reconstruction_loss(block, x, eps, V, c)
            grad_v, grad_c = torch.autograd.grad(value, (V, c))
        sgd.step(f"{name}.weight", block.feedback_weight, grad_v, lr)
        sgd.step(f"{name}.bias", block.feedback_bias, grad_c, lr)
        loss = float(value.detach())
    return loss


def penultimate_gradient_target(records: List[BlockRecord], labels: torch.Tensor,
                                beta: float) -> torch.Tensor:
    """Lee et al. (2015)'s target for the last hidden block, t_{N-1} = s_{N-1} - beta *
    d(sum_b CE)/d s_{N-1}: one gradient step through the output block's own forward op (for
    the linear classifier, s_{N-1} - beta W^T (softmax - onehot))."""
    last = records[-1]
    with torch.enable_grad():
        s = last.input.detach().requires_grad_(True)
        out = forward_block(last.block, s)[0]
        grad = torch.autograd.grad(F.cross_entropy(out, labels, reduction="sum"), s)[0]
    return (s - beta * grad).detach().reshape(records[-2].output.shape)


def reconstruction_targets(logits: torch.Tensor, labels: torch.Tensor, records: List[BlockRecord],
                           *, difference: bool, penultimate: str) -> List[torch.Tensor]:
    """Targets t_1..t_N (paper form, SPEC §3) of vanilla DTP (`difference`: t_{n-1} = s_{n-1} +
    G_n(t_n) - G_n(s_n)) or TP (t_{n-1} = G_n(t_n)), all with clean pool indices. t_N = s_N -
    beta * grad of the sum-reduced CE; t_{N-1} per `penultimate` ("gradient" or "feedback")."""
    if penultimate not in PENULTIMATE_TARGETS:
        raise ValueError(f"penultimate target must be one of {PENULTIMATE_TARGETS}, "
                         f"got {penultimate!r}")
    beta = records[-1].block.beta
    targets: List[Optional[torch.Tensor]] = [None] * len(records)
    targets[-1] = first_target(logits, labels, beta)
    top = len(records) - 1  # the highest block whose feedback propagates a target down
    if penultimate == "gradient" and len(records) > 1:
        targets[-2] = penultimate_gradient_target(records, labels, beta)
        top -= 1
    with torch.no_grad():
        for n in range(top, 0, -1):
            t = feedback(records[n], targets[n])
            if difference:
                t = records[n].input + t - feedback(records[n], records[n].output.detach())
            targets[n - 1] = t.reshape(records[n - 1].output.shape)
    return targets


class _ReconstructionFeedback(Algorithm):
    penultimate_target = "feedback"
    difference = True

    def __init__(self, model, feedback, input_shape, classes, *,
                 penultimate_target: Optional[str] = None):
        super().__init__(model, feedback, input_shape, classes)
        self.sgd = MomentumSGD(feedback.momentum)
        if penultimate_target is not None:
            self.penultimate_target = penultimate_target
        if self.penultimate_target not in PENULTIMATE_TARGETS:
            raise ValueError(f"penultimate_target must be one of {PENULTIMATE_TARGETS}, "
                             f"got {self.penultimate_target!r}")

    @torch.no_grad()
    def train_feedback(self, inputs, step):
        # With the "gradient" penultimate target the output block's G shapes no target; it is
        # trained all the same (cheap: 10 -> 512 on mnist-convnet), so its alignment is logged
        # and both choices draw the same noise.
        iterations = self.feedback.iterations_at(step)
        for (name, block), x, k, sigma, lr in zip(self.trained, inputs, iterations,
                                                  self.feedback.noise, self.feedback.lr):
            x = block_input(block, x.detach())
            # Zero buffers behave as torch.optim.SGD's first step (buf = grad).
            buf_w = self.sgd.buffers.setdefault(f"{name}.weight", torch.zeros_like(block.feedback_weight))
            buf_b = self.sgd.buffers.setdefault(f"{name}.bias", torch.zeros_like(block.feedback_bias))
            losses = ops.reconstruction_feedback_loop(
                x, block.weight, block.bias, block.feedback_weight, block.feedback_bias, buf_w,
                buf_b, k, sigma, lr, self.sgd.momentum, 0.0, chunk_iterations(block, x, self.feedback.memory_budget_mb),
                block.geometry())
            self.last_feedback_losses[name] = float(losses[-1]) if k else float("nan")

    def _targets(self, logits, y, records) -> List[torch.Tensor]:
        return reconstruction_targets(logits, y, records, difference=self.difference,
                                      penultimate=self.penultimate_target)

    def _explicit_train_step(self, x, y, step):
        """Block by block: forward, feedback training, then the targets with the fresh feedback
        weights and the layer-local losses' gradients (SPEC §2.2's order)."""
        logits, records = forward_records(self.model, x)
        self.train_feedback([r.input for r in records[1:]], step)
        if not self.feedback.feedback_only(step):
            layer_loss_gradients(records, self._targets(logits, y, records), records[-1].block.beta,
                                 accumulate=True)
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
        # SPEC's form: every target through the DTP blocks' fused backward.
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
