"""Backpropagation through the same network (the feedback buffers are simply unused)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..chain import forward_bp
from .base import Algorithm


class Backprop(Algorithm):
    name = "bp"
    has_feedback_weights = False

    def train_step(self, x, y, step):
        logits = forward_bp(self.model, x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return loss.detach(), logits.detach()

    def feedback_state(self):
        return []  # no feedback training

    def update_directions(self, x, y):
        loss = F.cross_entropy(forward_bp(self.model, x), y)
        return list(torch.autograd.grad(loss, [b.weight for _, b in self.blocks]))
