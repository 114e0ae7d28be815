"""Alignment metrics between forward and feedback weights (docs/maths.md §12)."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .nn import Linear, dtp_blocks


def feedback_in_forward_shape(block, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The feedback weight targets use (`block.target_feedback_weight`, or `weight`) brought
    to the forward weight's shape (Linear: V^T; conv: V)."""
    fw = block.target_feedback_weight if weight is None else weight
    return fw.t() if isinstance(block, Linear) else fw


def tap_weighted(w: torch.Tensor, tap_use=(1.0,)) -> torch.Tensor:
    """A weight in the forward shape with each kernel tap scaled by the square root of its use
    (BlockShape.tap_use): dot products of such tensors weigh each tap by how many output
    positions it reads inside the input, i.e. compare what the feedback does on that map
    (docs/maths.md §12). `tap_use` (1.0,): `w` itself."""
    if len(tap_use) == 1:
        return w
    return w * _tap_scale(tuple(tap_use), w.dtype, w.device).reshape(w.shape[2:])


@functools.lru_cache(maxsize=256)
def _tap_scale(tap_use: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Kept: a host-to-device copy at every step would synchronise the stream.
    return torch.tensor(tap_use, dtype=dtype).sqrt().to(device)


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two tensors flattened to vectors, in degrees."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    return math.degrees(math.acos(max(-1.0, min(1.0, float(cos)))))


def weight_alignment(block, tap_use=(1.0,)) -> dict[str, float]:
    """angle(W, V) in degrees and the relative distance |W - V| / |W| for one block, V the
    feedback weight its targets use; with `tap_use` (a plan's BlockShape.tap_use), kernel taps
    weighed by their use on the map the block ran on (taps that only read padding left out)."""
    w = tap_weighted(block.weight.detach(), tap_use)
    v = tap_weighted(feedback_in_forward_shape(block).detach(), tap_use)
    return {
        "angle": angle_degrees(w, v),
        "distance": float((w - v).double().norm() / w.double().norm()),
    }


def model_alignment(model: nn.Module) -> dict[str, dict[str, float]]:
    """weight_alignment for every DTP block of a model, by module name."""
    return {name: weight_alignment(block) for name, block in dtp_blocks(model)}
