"""How many feedback-only warm-up steps the averages of blocks held above target by a cost cap
need to meet it: `BlockPlan.steps_to` (what `explain()` prints, docs/maths.md §7.3) against a
run. An MLP 784-256-256-128-64-10 (Tanh), converted with `dtp_ext.convert`, `FeedbackTrainer`
at its defaults but `feedback_only_max_cost` (4 by default: the cap holds its hidden blocks
above the 4-degree target), on consecutive MNIST training batches; per block above target,
the first step at which the angle of the weight its targets use (the average) to W^T is at
most the target (`FeedbackReport.alignment()`), next to the prediction made at the second
step (the first feedback-only one). Seed 0, one seed, one thread.

    python benchmarks/steps_to_target.py [--batch 16] [--cap 4] [--margin 1.2] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import dtp_ext
from conftest import cpu_features
from dtp_ext.train.batches import normalise
from dtp_ext.train.datasets import INFO, load_split


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cap", type=float, default=4.0, help="feedback_only_max_cost")
    parser.add_argument(
        "--margin", type=float, default=1.2, help="run this many times the longest prediction"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, feedback_only_max_cost {args.cap:g}, seed 0 (one seed)")
    print(cpu_features())
    torch.manual_seed(0)
    layers, width = [nn.Flatten()], 784
    for hidden in (256, 256, 128, 64):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    model = dtp_ext.convert(nn.Sequential(*layers, nn.Linear(width, 10)))
    trainer = dtp_ext.FeedbackTrainer(model, feedback_only_max_cost=args.cap)
    info, data = INFO["mnist"], load_split("mnist", None, "train")
    usable = len(data.images) // args.batch * args.batch

    def forward(step):
        start = step * args.batch % usable
        model(normalise(data.images[start : start + args.batch], info.mean, info.std))

    forward(0)
    trainer.step()
    forward(1)
    trainer.step()  # the first feedback-only step: its plans are the warm-up's
    target = trainer.target_angle
    predicted = {n: p.steps_to(target) for n, p in trainer.plans.items() if p.floor.angle > target}
    print("\n".join(line for line in trainer.explain().splitlines() if "above target" in line))
    reached, begin = {}, time.perf_counter()
    for step in range(2, int(max(predicted.values()) * args.margin) + 1):
        forward(step)
        report = trainer.step()
        angles = report.alignment()
        for name in predicted:
            if name not in reached and angles[name]["angle"] <= target:
                reached[name] = step + 1  # steps so far, this one included
        if len(reached) == len(predicted):
            break
    print(f"{time.perf_counter() - begin:.0f} s")
    print("block  plan (iterations x copies)  floor after 100 steps  predicted steps  reached at")
    for name, steps in predicted.items():
        plan = trainer.plans[name]
        print(
            f"{name:<6} {plan.iterations:>3} x {plan.copies:<3}{'':<20}{plan.floor.angle:6.2f}°"
            f"{steps:>18}  {reached.get(name, 'not reached')!s:>10}"
        )


if __name__ == "__main__":
    main()
