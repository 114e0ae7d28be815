"""Per-layer alignment metrics (docs/maths.md §12) for the epoch log.

- weight angle / distance between each block's forward weight and its feedback weight;
- update angle: between the algorithm's weight update direction and backprop's gradient on a
  fixed probe batch (the Gradient Matching Property, layer by layer).
"""

from __future__ import annotations

import torch

from dtp_ext.metrics import angle_degrees, weight_alignment
from dtp_ext.reference import backprop_gradients

from .algorithms import Algorithm


def layer_metrics(
    algorithm: Algorithm, x: torch.Tensor, y: torch.Tensor
) -> dict[str, dict[str, float]]:
    blocks = algorithm.blocks
    metrics: dict[str, dict[str, float]] = {"update_angle": {}}
    if algorithm.has_feedback_weights:
        metrics["weight_angle"], metrics["weight_distance"] = {}, {}
        # Kernel taps weighed by their use on the block's map where a plan knows it.
        plans = getattr(getattr(algorithm, "trainer", None), "plans", {})
        for name, block in algorithm.trained:
            plan = plans.get(name)
            alignment = weight_alignment(block, plan.shape.tap_use if plan else (1.0,))
            metrics["weight_angle"][name] = alignment["angle"]
            metrics["weight_distance"][name] = alignment["distance"]
    bp = backprop_gradients(algorithm.model, blocks, x, y)
    ours = algorithm.update_directions(x, y)
    for (name, _), g_bp, g in zip(blocks, bp, ours):
        metrics["update_angle"][name] = angle_degrees(g, g_bp)
    return metrics
