"""Alignment metrics between forward and feedback weights (SPEC §6)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .nn import Linear, dtp_blocks


def feedback_in_forward_shape(block) -> torch.Tensor:
    """The feedback weight brought to the forward weight's shape (Linear: V^T; conv: V)."""
    fw = block.feedback_weight
    return fw.t() if isinstance(block, Linear) else fw


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two tensors flattened to vectors, in degrees."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    return math.degrees(math.acos(max(-1.0, min(1.0, float(cos)))))


def weight_alignment(block) -> dict[str, float]:
    """angle(W, V) in degrees and the relative distance |W - V| / |W| for one block."""
    w = block.weight.detach()
    v = feedback_in_forward_shape(block).detach()
    return {
        "angle": angle_degrees(w, v),
        "distance": float((w - v).double().norm() / w.double().norm()),
    }


def model_alignment(model: nn.Module) -> dict[str, dict[str, float]]:
    """weight_alignment for every DTP block of a model, by module name."""
    return {name: weight_alignment(block) for name, block in dtp_blocks(model)}
