"""Functional access to the fused kernels for one block (research and tests)."""
from __future__ import annotations

import torch

from . import ops
from .nn import Conv2d, DTPBlock, Linear


@torch.no_grad()
def ldrl_loss(layer: DTPBlock, x: torch.Tensor, noise_x: torch.Tensor, noise_y: torch.Tensor):
    """SPEC §2.1 for one block on input batch `x` with explicit, already scaled noise.

    noise_x has x's shape, noise_y the block output's. Returns (loss, grad_feedback_weight,
    grad_feedback_bias) through the same fused kernels as FeedbackTrainer; the bias gradient is
    exactly zero (both loss terms are differences of G, so c cancels).
    """
    if isinstance(layer, Linear):
        x = x.reshape(-1, layer.in_features)
        noise_x = noise_x.reshape(x.shape)
        noise_y = noise_y.reshape(x.shape[0], layer.out_features)
    elif isinstance(layer, Conv2d):
        if x.dim() == 3:
            x, noise_x, noise_y = x.unsqueeze(0), noise_x.unsqueeze(0), noise_y.unsqueeze(0)
    else:
        raise TypeError(f"ldrl_loss: layer must be a dtp_ext.Linear or dtp_ext.Conv2d, got {type(layer).__name__}")
    return ops.ldrl_loss(x, layer.weight, layer.bias, layer.feedback_weight, noise_x, noise_y,
                         layer.geometry())
