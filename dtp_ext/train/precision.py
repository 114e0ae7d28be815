"""`dtp-ext train --precision fp32|bf16|fp16`: the number format of a run.

bf16 runs the forward pass (and evaluation) under torch.autocast in bfloat16 and the feedback
phase in bfloat16 (FeedbackTrainer's compute_dtype, float32 master feedback weights). fp16 does
the same in float16 and adds a torch.amp.GradScaler: the scaled loss's backward runs inside
dtp_ext.loss_scale(scale), without which the DTP blocks' targets would move by the scale
(README, "Loss scaling"). Forward weights and the optimizer stay float32 in every mode.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch

import dtp_ext
from dtp_ext import ops

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # config.PRECISIONS
# fp16: this many overflowing steps in a row (the scale halved each time) stop the run.
MAX_CONSECUTIVE_OVERFLOWS = 40


class Precision:
    def __init__(self, name: str, device: str):
        self.name = name
        self.dtype: torch.dtype | None = DTYPES[name]
        self.device_type = torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type) if name == "fp16" else None
        self.skipped_steps = 0  # fp16: steps whose scaled gradients overflowed
        self.consecutive_overflows = 0

    def autocast(self):
        """The forward pass's context: autocast in this precision's dtype (fp32: nothing)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, params: Iterable[torch.Tensor]) -> None:
        """loss.backward(), scaled under fp16. A scaled gradient that overflows float16 inside
        a DTP block makes its op refuse the non-finite input; the step's gradients are then
        set to inf so that, as for any overflow, GradScaler skips the step and lowers the scale
        (on every rank: the runner all-reduces the gradients before looking at them)."""
        if self.scaler is None:
            loss.backward()
            return
        scale = self.scaler.get_scale()
        try:
            with dtp_ext.loss_scale(scale):
                self.scaler.scale(loss).backward()
        except ops.NonFiniteInputError:
            for p in params:
                if p.requires_grad:
                    p.grad = torch.full_like(p, math.inf)

    def step(self, optimizer: torch.optim.Optimizer, overflow: bool) -> bool:
        """The optimizer step; False when fp16's scaled gradients overflowed (`overflow`, from
        the all-reduced gradients) and the step was skipped with the scale lowered."""
        if self.scaler is None:
            optimizer.step()
            return True
        if not any(p.grad is not None for g in optimizer.param_groups for p in g["params"]):
            return True  # a feedback-only step: no forward gradient, nothing to unscale
        self.scaler.unscale_(optimizer)  # records the overflow GradScaler.step looks for
        self.scaler.step(optimizer)  # skipped if any gradient is inf/NaN
        self.scaler.update()  # halves the scale after an overflow, else may grow it
        if overflow:
            self.skipped_steps += 1
            self.consecutive_overflows += 1
        else:
            self.consecutive_overflows = 0
        return not overflow

    def summary(self) -> dict:
        """summary.json's "precision"."""
        return {
            "name": self.name,
            "skipped_steps": self.skipped_steps,
            "loss_scale": None if self.scaler is None else self.scaler.get_scale(),
        }

    def state_dict(self) -> dict:
        state = {
            "name": self.name,
            "skipped_steps": self.skipped_steps,
            "consecutive_overflows": self.consecutive_overflows,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint of this precision: --resume refuses another one before this (the saved
        configuration, checkpoint.check_compatible)."""
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_overflows = int(state.get("consecutive_overflows", 0))
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
