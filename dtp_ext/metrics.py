"""Alignment metrics between forward and feedback weights (docs/maths.md §12)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .nn import Linear, dtp_blocks


def feedback_in_forward_shape(block, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The feedback weight targets use (`block.target_feedback_weight`, or `weight`) brought
    to the forward weight's shape (Linear: V^T; conv: V)."""
    fw = block.target_feedback_weight if weight is None else weight
    return fw.t() if isinstance(block, Linear) else fw


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two tensors flattened to vectors, in degrees."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    return math.degrees(math.acos(max(-1.0, min(1.0, float(cos)))))


def weight_alignment(block) -> dict[str, float]:
    """angle(W, V) in degrees and the relative distance |W - V| / |W| for one block, V the
    feedback weight its targets use."""
    w = block.weight.detach()
    v = feedback_in_forward_shape(block).detach()
    return {
        "angle": angle_degrees(w, v),
        "distance": float((w - v).double().norm() / w.double().norm()),
    }


def model_alignment(model: nn.Module) -> dict[str, dict[str, float]]:
    """weight_alignment for every DTP block of a model, by module name."""
    return {name: weight_alignment(block) for name, block in dtp_blocks(model)}
