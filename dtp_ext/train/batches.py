"""Deterministic batches: the order is a function of (seed, epoch) and each batch's augmentation
of (seed, epoch, step), so a resumed run can skip to any step and see exactly the batches an
uninterrupted run would (the global RNG, used by the feedback noise, stays untouched).
"""
from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import torch
import torch.nn.functional as F

from .datasets import ImageSet


def _generator(*key: int) -> torch.Generator:
    seed = 0
    for k in key:  # a simple, stable mix of the key into 63 bits
        seed = (seed * 1_000_003 + int(k) + 0x9E3779B9) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(count, generator=_generator(seed, epoch, 1))


def steps_per_epoch(count: int, batch_size: int) -> int:
    return -(-count // batch_size)  # the last, smaller batch is kept


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = images.float().div_(255)
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The paper's augmentation: pad by replicating the edge, random crop back, random h-flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (top[:, None] + torch.arange(h)[None]).to(x.device)
    cols = left[:, None] + torch.arange(w)[None]
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def train_batches(data: ImageSet, batch_size: int, seed: int, epoch: int, start_step: int,
                  mean, std, augment: bool, device) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
    """(step, inputs, labels) for steps start_step.. of the epoch."""
    order = epoch_order(len(data), seed, epoch)
    for step in range(start_step, steps_per_epoch(len(data), batch_size)):
        index = order[step * batch_size:(step + 1) * batch_size]
        x = normalise(data.images[index].to(device), mean, std)
        if augment:
            x = random_crop_flip(x, _generator(seed, epoch, step, 2))
        yield step, x, data.labels[index].to(device)


def eval_batches(data: ImageSet, batch_size: int, mean, std, device):
    for start in range(0, len(data), batch_size):
        x = normalise(data.images[start:start + batch_size].to(device), mean, std)
        yield x, data.labels[start:start + batch_size].to(device)
