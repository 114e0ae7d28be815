"""Running train metrics and the test evaluation of `dtp-ext train` (loss, top-1, top-5)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import distributed
from .batches import eval_batches, shard
from .config import TrainConfig
from .datasets import ImageSet


class RunningTotals:
    """Running train loss and top-1/top-5 over an epoch (plain floats: saved in checkpoints)."""

    def __init__(self, state: dict | None = None):
        self.state = dict(state or {"loss": 0.0, "top1": 0, "top5": 0, "seen": 0})

    def add(self, loss: float, logits: torch.Tensor, labels: torch.Tensor):
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        n = labels.shape[0]
        self.add_totals(loss * n, int(hit[:, 0].sum()), int(hit.any(1).sum()), n)

    def add_totals(self, loss_sum: float, top1, top5, seen):
        self.state["loss"] += loss_sum
        self.state["top1"] += int(top1)
        self.state["top5"] += int(top5)
        self.state["seen"] += int(seen)

    def means(self, prefix: str) -> dict[str, float]:
        n = max(self.state["seen"], 1)
        return {
            f"{prefix}_loss": self.state["loss"] / n,
            f"{prefix}_top1": 100 * self.state["top1"] / n,
            f"{prefix}_top5": 100 * self.state["top5"] / n,
        }


def batch_totals(
    loss: torch.Tensor | None, logits: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """[loss * n, top-1 hits, top-5 hits, n, loss not finite] as float64, without a device sync."""
    n = labels.shape[0]
    if loss is None:  # the step failed before producing a loss
        return torch.tensor([math.nan, 0, 0, n, 1], dtype=torch.float64, device=labels.device)
    hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
    loss = loss.double()
    return torch.stack(
        [
            loss * n,
            hit[:, 0].sum().double(),
            hit.any(1).sum().double(),
            loss.new_tensor(float(n)),
            (~torch.isfinite(loss)).double(),
        ]
    )


@torch.no_grad()
def evaluate(
    model, data: ImageSet, cfg: TrainConfig, info, ctx: distributed.Context | None = None
) -> dict[str, float]:
    """Test metrics; with several processes each rank evaluates its shard and the sums are reduced."""
    ctx = ctx or distributed.Context(device=cfg.device)
    lo, hi = shard(len(data), ctx.rank, ctx.world)
    was_training = model.training
    model.eval()
    counter = RunningTotals()
    part = ImageSet(data.images[lo:hi], data.labels[lo:hi])
    for x, y in eval_batches(part, cfg.eval_batch_size, info.mean, info.std, ctx.device):
        logits = model(x)
        counter.add(float(F.cross_entropy(logits, y)), logits, y)
    model.train(was_training)
    if ctx.world > 1:
        keys = ("loss", "top1", "top5", "seen")
        counter = RunningTotals(dict(zip(keys, ctx.sum_floats([counter.state[k] for k in keys]))))
    return counter.means("test")
