"""DRL / DDTP-linear, "p" and "s" variants (Meulemans et al. 2020; docs/maths.md §10).

Direct linear feedback Q_k from the output to each hidden block output h_k (k < N):
target t_k = h_k + Q_k (t_N - h_N). Q_k is trained with
(1/sigma^2) mean_b |Q_k (y~ - h_N) - sigma eps|^2, where y~ is h_k + sigma eps propagated
through the rest of the network (non-local). Per batch: forward gradients with the old Q,
then Q's iterations, then the loop's optimizer step. "s" (`variant="s"`, `--drl-variant s`):
whole epochs alternate, starting with Q's (epochs 1, 3, ...: Q trained on every batch, no forward
gradient) then the forward weights' (epochs 2, 4, ...: targets from the frozen Q). The gradient
of this quadratic loss in Q is written out (2/(B sigma^2) (Q d - sigma eps)^T d), so no autograd
is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dtp_ext.reference import first_target, layer_loss_gradients

from ..chain import forward_from, forward_records
from ..config import DRL_VARIANTS, check_choice
from .base import Algorithm, target_update_directions
from .feedback_sgd import MomentumSGD


class DRL(Algorithm):
    name = "drl"
    has_feedback_weights = False  # Q maps output -> layer k; there is no W to compare it with

    def __init__(self, model, feedback, input_shape, classes, *, variant: str = "p"):
        super().__init__(model, feedback, input_shape, classes)
        check_choice("DRL variant", variant, DRL_VARIANTS)
        self.variant = variant
        weight = self.blocks[0][1].weight
        device, dtype = weight.device, weight.dtype
        with torch.no_grad():
            _, records = forward_records(
                model, torch.zeros((1, *input_shape), device=device, dtype=dtype)
            )
        bound = 1 / math.sqrt(classes)  # nn.Linear(classes, features)'s default init range
        self.Q = [
            torch.empty(r.output[0].numel(), classes, device=device, dtype=dtype).uniform_(
                -bound, bound
            )
            for r in records[:-1]
        ]
        self.sgd = MomentumSGD(feedback.momentum)

    def _targets(self, logits, y, records) -> list[torch.Tensor]:
        t_last = first_target(logits, y, records[-1].block.beta)
        diff = t_last - logits.detach()
        with torch.no_grad():  # targets are constants of the layer losses
            targets = [
                (r.output.flatten(1) + diff @ Q.t()).reshape(r.output.shape)
                for r, Q in zip(records[:-1], self.Q)
            ]
        return targets + [t_last]

    @torch.no_grad()
    def train_feedback(self, records, logits, step, layers=None):
        """Q's iterations for the hidden layers `layers` (indices; default all)."""
        h_last = logits.detach()
        iterations = self.feedback.iterations_at(step)
        for k in range(len(self.Q)) if layers is None else layers:
            record, Q = records[k], self.Q[k]
            sigma, lr = self.feedback.noise[k], self.feedback.lr[k]
            h = record.output.detach()
            loss = float("nan")
            for _ in range(iterations[k]):
                noise = torch.randn_like(h) * sigma
                d = (forward_from(self.model, record.position, h + noise) - h_last).flatten(1)
                residual = d @ Q.t() - noise.flatten(1)
                grad = residual.t() @ d * (2 / (h.shape[0] * sigma**2))
                self.sgd.step(f"Q{k}", Q, grad, lr)
                loss = float(residual.pow(2).sum(1).mean() / sigma**2)
            self.last_feedback_losses[self.trained[k][0]] = loss

    def feedback_epoch(self) -> bool:
        """Whether this epoch trains Q only ("s" variant, odd-numbered epochs counting from 1)."""
        return self.variant == "s" and self.epoch % 2 == 0

    def train_step(self, x, y, step):
        logits, records = forward_records(self.model, x)
        feedback_only = self.feedback_epoch() or self.feedback.feedback_only(step)
        if not feedback_only:
            layer_loss_gradients(
                records, self._targets(logits, y, records), records[-1].block.beta, accumulate=True
            )
        if self.variant == "p" or feedback_only:
            self.train_feedback(records, logits, step)
        return F.cross_entropy(logits.detach(), y), logits.detach()

    def update_directions(self, x, y):
        return target_update_directions(self, x, y)

    def feedback_state(self):
        return list(self.Q) + [self.sgd.buffers[k] for k in sorted(self.sgd.buffers)]

    def state_dict(self):
        return {"Q": [q.clone() for q in self.Q], "sgd": self.sgd.state_dict()}

    def load_state_dict(self, state):
        device = self.Q[0].device
        for q, saved in zip(self.Q, state["Q"]):
            q.copy_(saved.to(device))
        self.sgd.load_state_dict(state["sgd"], device)
