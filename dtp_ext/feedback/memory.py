"""How many feedback iterations share one batched F(x + eps) within the memory budget
(`FeedbackTrainer(memory_budget_mb=...)`, docs/memory.md)."""

from __future__ import annotations

import math

import torch

from ..nn import DTPBlock
from .settings import MAX_ITERATIONS


@torch.no_grad()
def feedback_bytes_per_iteration(block: DTPBlock, x: torch.Tensor) -> int:
    """Bytes one feedback iteration of `block` on input `x` holds while it is batched with
    others: what `memory_budget_mb` is divided by (docs/memory.md)."""
    # Shapes only: the block's forward on meta tensors (no computation, no data).
    meta = {"device": "meta", "dtype": block.weight.dtype}  # (x may be bfloat16)
    out, _ = block.forward_with_indices(
        torch.empty(x[:1].shape, **meta),
        torch.empty(block.weight.shape, **meta),
        None if block.bias is None else torch.empty(block.bias.shape, **meta),
    )
    pool_area = block.pool**2 if block.pool else 1
    # Per iteration and sample: eps and x + eps; the conv output and its activation (pool
    # input); the pooled output, eta and, with a pool, int64 indices.
    elements = 2 * x[0].numel() + 2 * out.numel() * pool_area + 2 * out.numel()
    return x.shape[0] * (elements * x.element_size() + (8 * out.numel() if block.pool else 0))


def chunk_iterations(block: DTPBlock, x: torch.Tensor, memory_budget_mb: float) -> int:
    """How many feedback iterations of `block` on input `x` may share one batched F(x + eps)
    within `memory_budget_mb` of extra memory (at least one)."""
    budget = memory_budget_mb * 2**20  # bytes; inf for a budget near float64's largest
    chunk = budget // feedback_bytes_per_iteration(block, x) if math.isfinite(budget) else math.inf
    # More iterations than a step can run is as good as unlimited.
    return max(1, int(min(chunk, MAX_ITERATIONS)))
