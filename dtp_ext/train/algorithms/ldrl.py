"""L-DRL (docs/maths.md §2-§4): fused feedback training, then the DTP blocks' fused backward."""

from __future__ import annotations

import torch.nn.functional as F

import dtp_ext

from .base import Algorithm, fused_update_directions


class LDRL(Algorithm):
    name = "ldrl"

    def __init__(self, model, feedback, input_shape, classes):
        super().__init__(model, feedback, input_shape, classes)
        # Under several processes the trainer keeps the feedback weights identical on every
        # rank itself (feedback.sync: "gradients" by default, or "weights").
        self.trainer = dtp_ext.FeedbackTrainer(
            model,
            feedback.iterations,
            feedback.noise,
            feedback.lr,
            momentum=feedback.momentum,
            sync=feedback.sync,
            memory_budget_mb=feedback.memory_budget_mb,
        )

    def use_precision(self, precision):
        super().use_precision(precision)
        self.trainer.compute_dtype = precision.dtype  # None: the model's float32

    def train_step(self, x, y, step):
        self.model.train()
        with self.precision.autocast():
            logits = self.model(x)  # each block records its input for the feedback phase
            loss = F.cross_entropy(logits, y)
        self.trainer.iterations = self.feedback.iterations_at(step)
        report = self.last_report = self.trainer.step()
        self.last_feedback_losses = report.final_losses()
        if not self.feedback.feedback_only(step):
            # The backward reads the feedback weights now: the freshly trained ones (docs/maths.md §4).
            self.precision.backward(loss, self.model.parameters())
        return loss.detach(), logits.detach()

    last_report = None

    def feedback_quality(self):
        """FeedbackReport.alignment() of the latest step, with each block's settings."""
        if self.last_report is not None:
            quality = self.last_report.alignment()
            for name, row in quality.items():
                plan = self.trainer.plans[name]
                row.update(iterations=plan.iterations, copies=plan.copies, lr=plan.lr)
            self.last_feedback_quality, self.last_report = quality, None
        return self.last_feedback_quality

    def update_directions(self, x, y):
        return fused_update_directions(self.model, self.blocks, x, y)

    def state_dict(self):
        return {"trainer": self.trainer.state_dict()}

    def load_state_dict(self, state):
        self.trainer.load_state_dict(state["trainer"])
