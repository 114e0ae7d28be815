"""Deterministic batches: the order is a function of (seed, epoch) and each batch's augmentation
of (seed, epoch, step), so a resumed run can skip to any step and see exactly the batches an
uninterrupted run would (the global RNG, used by the feedback noise, stays untouched).

Under several processes every step's batch is the global batch of a single-process run, cut
into one contiguous shard per rank (`shard`): rank r trains on images [lo_r, hi_r) of it, with
the augmentation drawn for the whole global batch, so the union of the shards is exactly the
single-process batch whatever the number of processes. An epoch's last, smaller batch is
dropped when it has fewer images than there are processes (a rank would get none).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from .datasets import ImageSet


def mix_seed(*key: int) -> int:
    """A simple, stable mix of integers into a 63-bit seed (batches here, rank seeds in
    distributed.py)."""
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k) + 0x9E3779B9) % (2**63 - 1)
    return seed


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*key))


def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(count, generator=_generator(seed, epoch, 1))


def steps_per_epoch(count: int, batch_size: int, world: int = 1) -> int:
    """The last, smaller batch is kept, if it has an image for each of the `world` processes."""
    return count // batch_size + (1 if count % batch_size >= world else 0)


def batch_count(count: int, batch_size: int, step: int) -> int:
    """Images in the global batch of `step`."""
    return max(0, min(batch_size, count - step * batch_size))


def shard(count: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of `count` items (sizes differ by at most one)."""
    return count * rank // world, count * (rank + 1) // world


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = images.float().div_(255)
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The paper's augmentation: pad by replicating the edge, random crop back, random h-flip."""
    return crop_flip(x, *crop_flip_draws(x.shape[0], generator, pad), pad)


def crop_flip_draws(n: int, generator: torch.Generator, pad: int = 4):
    """(top, left, flip) of n images: what random_crop_flip draws."""
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return top, left, flip


def crop_flip(x: torch.Tensor, top, left, flip, pad: int = 4) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    rows = (top[:, None] + torch.arange(h)[None]).to(x.device)
    cols = left[:, None] + torch.arange(w)[None]
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def train_batches(
    data: ImageSet,
    batch_size: int,
    seed: int,
    epoch: int,
    start_step: int,
    mean,
    std,
    augment: bool,
    device,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(step, inputs, labels) for steps start_step.. of the epoch: rank's shard of each batch."""
    order = epoch_order(len(data), seed, epoch)
    for step in range(start_step, steps_per_epoch(len(data), batch_size, world)):
        index = order[step * batch_size : (step + 1) * batch_size]
        lo, hi = shard(len(index), rank, world)
        x = normalise(data.images[index[lo:hi]].to(device), mean, std)
        if augment:
            draws = crop_flip_draws(len(index), _generator(seed, epoch, step, 2))
            x = crop_flip(x, *(d[lo:hi] for d in draws))
        yield step, x, data.labels[index[lo:hi]].to(device)


def eval_batches(data: ImageSet, batch_size: int, mean, std, device):
    for start in range(0, len(data), batch_size):
        x = normalise(data.images[start : start + batch_size].to(device), mean, std)
        yield x, data.labels[start : start + batch_size].to(device)
