"""Vanilla DTP (Lee et al. 2015) and TP (SPEC §5): feedback trained to invert the block,
mean_b sum ((x + eps) - G(F(x + eps)))^2 with the noisy pass's pool indices.

Training runs through the fused kernel `dtp_ext.ops.reconstruction_feedback_loop` (the whole
K-iteration loop in one call); `train_reconstruction` is the same loop by autograd on
dtp_ext.block_math ops, kept as the reference the tests compare the kernel with. Vanilla DTP then uses the DTP blocks' fused backward (difference targets, as L-DRL); TP uses
plain targets t_{n-1} = G_n(t_n) and layer-local losses.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from dtp_ext import ops
from dtp_ext.block_math import block_input, feedback_block, forward_block
from dtp_ext.trainer import chunk_iterations

from ..chain import feedback, first_target, forward_records, layer_loss_gradients
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


class _ReconstructionFeedback(Algorithm):
    def __init__(self, model, feedback, input_shape, classes):
        super().__init__(model, feedback, input_shape, classes)
        self.sgd = MomentumSGD(feedback.momentum)

    @torch.no_grad()
    def train_feedback(self, inputs, step):
        iterations = self.feedback.iterations_at(step)
        for (name, block), x, k, sigma, lr in zip(self.trained, inputs, iterations,
                                                  self.feedback.noise, self.feedback.lr):
            x = block_input(block, x.detach())
            # Zero buffers behave as torch.optim.SGD's first step (buf = grad).
            buf_w = self.sgd.buffers.setdefault(f"{name}.weight", torch.zeros_like(block.feedback_weight))
            buf_b = self.sgd.buffers.setdefault(f"{name}.bias", torch.zeros_like(block.feedback_bias))
            losses = ops.reconstruction_feedback_loop(
                x, block.weight, block.bias, block.feedback_weight, block.feedback_bias, buf_w,
                buf_b, k, sigma, lr, self.sgd.momentum, 0.0, chunk_iterations(block, x, 256.0),
                block.geometry())
            self.last_feedback_losses[name] = float(losses[-1]) if k else float("nan")

    def state_dict(self):
        return {"sgd": self.sgd.state_dict()}

    def load_state_dict(self, state):
        self.sgd.load_state_dict(state["sgd"], self.blocks[0][1].weight.device)


class VanillaDTP(_ReconstructionFeedback):
    name = "dtp"

    def train_step(self, x, y, step):
        self.model.train()
        logits = self.model(x)
        self.train_feedback([b.recorded_input for _, b in self.trained], step)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return loss.detach(), logits.detach()

    def update_directions(self, x, y):
        return fused_update_directions(self.model, self.blocks, x, y)


class TargetProp(_ReconstructionFeedback):
    name = "tp"

    def _targets(self, logits, y, records) -> List[torch.Tensor]:
        beta = records[-1].block.beta
        targets = [None] * len(records)
        targets[-1] = first_target(logits, y, beta)
        with torch.no_grad():
            for n in range(len(records) - 1, 0, -1):  # t_{n-1} = G_n(t_n): no difference correction
                targets[n - 1] = feedback(records[n], targets[n]).reshape(records[n - 1].output.shape)
        return targets

    def train_step(self, x, y, step):
        logits, records = forward_records(self.model, x)
        self.train_feedback([r.input for r in records[1:]], step)
        layer_loss_gradients(records, self._targets(logits, y, records), records[-1].block.beta,
                             accumulate=True)
        return F.cross_entropy(logits.detach(), y), logits.detach()

    def update_directions(self, x, y):
        return target_update_directions(self, x, y)
