"""Backpropagation through the same network (the feedback buffers are simply unused).

The model's DTP blocks run as ordinary autograd ops through `dtp_ext.reference.backprop_twin`, a
copy of the model sharing its parameters and buffers, so any model trains: chains, and the
converted torchvision networks with their BatchNorm and residual adds.
"""

from __future__ import annotations

import torch.nn.functional as F

from dtp_ext.reference import backprop_gradients, backprop_twin

from .base import Algorithm


class Backprop(Algorithm):
    name = "bp"
    has_feedback_weights = False

    def __init__(self, model, feedback, input_shape, classes):
        super().__init__(model, feedback, input_shape, classes)
        self.backprop_model = backprop_twin(model)

    def train_step(self, x, y, step):
        self.backprop_model.train()
        with self.precision.autocast():
            logits = self.backprop_model(x)
            loss = F.cross_entropy(logits, y)
        self.precision.backward(loss, self.model.parameters())
        return loss.detach(), logits.detach()

    def feedback_state(self):
        return []  # no feedback training

    def update_directions(self, x, y):
        return backprop_gradients(self.model, self.blocks, x, y)
