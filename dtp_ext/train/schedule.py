"""The forward lr schedule of `dtp-ext train` (--scheduler): per epoch, a factor of --lr."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def make_scheduler(optimizer, cfg: TrainConfig):
    base = cfg.lr
    if cfg.scheduler == "cosine":
        # Cosine to eta_min over t_max epochs, then held there (the paper's code rises again
        # after t_max, docs/maths.md §14).
        def factor(epoch):
            e = min(epoch, cfg.t_max)
            lr = cfg.eta_min + (base - cfg.eta_min) * (1 + math.cos(math.pi * e / cfg.t_max)) / 2
            return lr / base if base > 0 else 1.0
    elif cfg.scheduler == "step":

        def factor(epoch):
            return cfg.gamma ** (epoch // cfg.step_size)
    else:

        def factor(epoch):
            return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
