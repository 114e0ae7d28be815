"""Noise copies against more iterations: one block's feedback step with the same noise samples
per step run as 16 iterations on its batch or 16/S iterations on S copies of it (the same floor
at the planned rates, docs/maths.md §8), for block shapes of the converted torchvision networks
on MNIST at batch 32. Prints each S's step time and its ratio to S = 1 (best of 3 after a warm-up
step, one thread): what `dtp_ext.alignment.NOISE_COPY_ROWS` is chosen from.

    python benchmarks/noise_copies.py [--blocks fc4096x4096,...] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import dtp_ext
from conftest import cpu_features

BATCH = 32
SAMPLES = 16  # single-batch iterations' worth of noise per step
COPIES = (1, 2, 4, 8, 16)
BLOCKS = {  # name: (block, per-sample input shape)
    "fc4096x4096": (lambda: dtp_ext.Linear(4096, 4096), (4096,)),
    "fc512x4096": (lambda: dtp_ext.Linear(512, 4096), (512,)),
    "fc512x10": (lambda: dtp_ext.Linear(512, 10), (512,)),
    "conv3x3-512-on-1x1": (lambda: dtp_ext.Conv2d(512, 512, 3, padding=1), (512, 1, 1)),
    "conv1x1-320-1280-on-2x2": (lambda: dtp_ext.Conv2d(320, 1280, 1), (320, 2, 2)),
    "conv3x3-256-on-3x3": (lambda: dtp_ext.Conv2d(256, 256, 3, padding=1), (256, 3, 3)),
    "conv3x3-512-on-4x4": (lambda: dtp_ext.Conv2d(512, 512, 3, padding=1), (512, 4, 4)),
    "depthwise3x3-576-on-4x4": (
        lambda: dtp_ext.Conv2d(576, 576, 3, padding=1, groups=576),
        (576, 4, 4),
    ),
    "conv3x3-64-on-14x14": (lambda: dtp_ext.Conv2d(64, 64, 3, padding=1), (64, 14, 14)),
}


def step_seconds(make, shape, copies):
    """Best of 3 feedback steps (after one warm-up step) of SAMPLES / copies iterations on
    `copies` copies of a batch."""
    torch.manual_seed(0)
    block = make()
    x = torch.randn(BATCH, *shape)
    trainer = dtp_ext.FeedbackTrainer(
        nn.Sequential(block),
        SAMPLES // copies,
        0.1,
        1e-4,
        blocks=[block],
        warm_start=False,
        average_decay=None,
    )
    block(x.repeat(copies, *[1] * len(shape)))
    times = []
    for _ in range(4):
        start = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default=",".join(BLOCKS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"batch {BATCH}, {SAMPLES} iterations' noise per step, {args.threads} threads, torch {torch.__version__}"
    )
    print(cpu_features())
    for name in args.blocks.split(","):
        make, shape = BLOCKS[name]
        rows = [BATCH * (shape[1] * shape[2] if len(shape) == 3 else 1) * s for s in COPIES]
        times = [step_seconds(make, shape, s) for s in COPIES]
        cells = "  ".join(
            f"S{s} ({r} rows) {t * 1e3:7.1f} ms ({t / times[0]:.2f})"
            for s, r, t in zip(COPIES, rows, times)
        )
        print(f"{name:<26} {cells}", flush=True)


if __name__ == "__main__":
    main()
