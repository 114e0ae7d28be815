"""The feedback weight's noise floor on maps where a kernel's border taps read padding: single
3x3 conv blocks (and depthwise ones) on 1x1 to 8x8 maps, at stride 1 and 2, trained alone with
fixed settings (K 5, noise 0.1, momentum 0.9, the given rate = lr x curvature). Prints, per
block, the measured angle between V and W^T (tan^2 averaged over steps 30-180, taps weighed by
their use; and over all taps, flat) next to `dtp_ext.alignment.noise_floor` with the block's
tap geometry (BlockShape) and with full-kernel fans (C k^2, what the formula used before);
then the plain mean of V over 150 steps (what a feedback-only warm-up's targets use) against
its prediction. docs/maths.md §7.1, §12. Seed 0, one seed.

    python benchmarks/floor_small_maps.py [--threads 1]
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import dtp_ext
from conftest import cpu_features
from dtp_ext.alignment import block_shape, curvature, noise_floor
from dtp_ext.metrics import feedback_in_forward_shape, tap_weighted

# (C_in, C_out, groups, map size, stride, batch, rate)
RAW = [
    (32, 32, 1, 1, 1, 32, 0.02),
    (32, 32, 1, 2, 1, 32, 0.02),
    (32, 32, 1, 3, 1, 16, 0.02),
    (32, 32, 1, 4, 1, 8, 0.02),
    (32, 32, 1, 7, 1, 4, 0.02),
    (32, 64, 1, 4, 2, 16, 0.02),
    (32, 64, 1, 8, 2, 8, 0.02),
    (32, 32, 1, 2, 2, 32, 0.02),
]
AVERAGED = [
    (32, 32, 1, 1, 1, 32, 0.02),
    (32, 32, 1, 3, 1, 16, 0.02),
    (32, 64, 1, 4, 2, 16, 0.02),
    (64, 64, 64, 3, 1, 32, 0.05),
    (64, 64, 64, 2, 2, 32, 0.05),
    (64, 64, 64, 7, 1, 4, 0.05),
]
ITERATIONS, NOISE, SETTLE, STEPS = 5, 0.1, 30, 180


def degrees(tan2):
    return math.degrees(math.atan(math.sqrt(tan2)))


def setup(cin, cout, groups, size, stride, batch, rate, average):
    torch.manual_seed(0)
    block = dtp_ext.Conv2d(cin, cout, 3, padding=1, stride=stride, groups=groups)
    x = torch.randn(batch, cin, size, size)
    shape = block_shape(block, x)
    trainer = dtp_ext.FeedbackTrainer(
        nn.Sequential(block),
        ITERATIONS,
        NOISE,
        rate / curvature(NOISE, shape.positions),
        0.9,
        blocks=[block],
        average_decay=0.9 if average else None,
    )
    block(x)
    return block, shape, trainer


def tan2(block, use):
    w = tap_weighted(block.weight.detach().double(), use).flatten()
    v = tap_weighted(feedback_in_forward_shape(block, block.feedback_weight).double(), use)
    cos = float(w @ v.flatten() / (w.norm() * v.norm()))
    return (1 - cos * cos) / (cos * cos)


def name(cin, cout, groups, size, stride, batch, rate):
    kind = "depthwise" if groups > 1 else f"{cin}->{cout}"
    return f"3x3 {kind} on {size}x{size}, stride {stride}, B {batch}, rate {rate}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; {cpu_features()}")
    print(
        "V itself, stationary (measured: taps weighed by use / flat; predicted: tap geometry / C k^2 fans)"
    )
    for case in RAW:
        block, shape, trainer = setup(*case, average=False)
        weighed, flat = [], []
        for step in range(STEPS):
            trainer.step()
            if step >= SETTLE:
                weighed.append(tan2(block, shape.tap_use))
                flat.append(tan2(block, (1.0,)))
        cin, cout, groups = case[:3]
        rate = case[-1]
        new = noise_floor(shape.fan_in, shape.fan_out, shape.samples, rate, tap_use=shape.tap_use)
        old = noise_floor(cin // groups * 9, cout // groups * 9, shape.samples, rate)
        print(
            f"  {name(*case):<46} measured {degrees(sum(weighed) / len(weighed)):5.1f}° / "
            f"{degrees(sum(flat) / len(flat)):5.1f}°  predicted {new.angle:5.1f}° / {old.angle:5.1f}°",
            flush=True,
        )
    print(f"V's plain mean over the steps after its transient ({STEPS - SETTLE} steps in all)")
    for case in AVERAGED:
        block, shape, trainer = setup(*case, average=True)
        for _ in range(STEPS - SETTLE):
            row = next(iter(trainer.step().alignment().values()))
        steps = trainer._averages.steps(next(iter(trainer.plans)))
        predicted = noise_floor(
            shape.fan_in,
            shape.fan_out,
            shape.samples,
            case[-1],
            iterations=ITERATIONS,
            average_decay=1.0,
            averaged_steps=int(steps),
            tap_use=shape.tap_use,
        )
        print(
            f"  {name(*case):<46} mean of {int(steps)} steps: measured {row['angle']:5.2f}°, "
            f"predicted {predicted.angle:5.2f}°",
            flush=True,
        )


if __name__ == "__main__":
    main()
