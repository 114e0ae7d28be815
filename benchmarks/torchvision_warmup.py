"""How far the L-DRL update of a converted torchvision network is from backprop, before and
after a feedback-only warm-up.

Each network is built as `dtp-ext train --model NAME` builds it for MNIST (random weights,
adapted to 1x28x28, converted; docs/training.md), with the command's default feedback settings
for it (K = 5 iterations per trained block, noise 0.1, lr scaled per block to its output
positions). The warm-up trains the feedback weights alone on consecutive MNIST training
batches (forward pass + FeedbackTrainer.step(), no forward-weight update), exactly as
`--feedback-only-steps` does. At each checkpoint (before, and after the listed numbers of
warm-up steps) one fixed batch (MNIST training images 32000..) measures, per DTP block:

- the angle between the L-DRL update (the weight gradient of the DTP backward) and backprop's
  gradient of the same loss, both in training mode on copies of the model with the same
  dropout masks and BatchNorm batch statistics;
- the norm ratio |L-DRL update| / |backprop gradient|;
- the weight angle between W and the feedback weight (SPEC §6).

The output block's update is backprop's exactly: the update summaries are over the other
blocks, the weight-angle summaries over the trained ones (all but the stem conv).

    python benchmarks/torchvision_warmup.py [--models resnet-small,resnet18,...] [--steps 5,20]
                                            [--batch 32] [--threads N] [--lr-rate R] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

import dtp_ext
from dtp_ext.metrics import angle_degrees, weight_alignment
from dtp_ext.reference import backprop_twin
from dtp_ext.train.batches import normalise
from dtp_ext.train.catalog import (
    block_positions,
    build_model,
    position_scaled_lr,
    trained_block_positions,
)
from dtp_ext.train.config import TrainConfig
from dtp_ext.train.datasets import INFO, load_split
from dtp_ext.train.resolve import resolve

MODELS = ("resnet-small", "resnet18", "vgg11_bn", "mobilenet_v2", "squeezenet1_1")


def directions(model, x, y):
    """{block: (L-DRL update, backprop gradient)} on copies of `model`, training mode."""
    grads = []
    for kind in ("ldrl", "bp"):
        m = copy.deepcopy(model).train()
        net = m if kind == "ldrl" else backprop_twin(m).train()
        with torch.random.fork_rng():
            torch.manual_seed(1234)  # the same dropout masks for both
            loss = F.cross_entropy(net(x), y)
        blocks = dtp_ext.dtp_blocks(m)
        grads.append(
            dict(
                zip(
                    [n for n, _ in blocks], torch.autograd.grad(loss, [b.weight for _, b in blocks])
                )
            )
        )
    return {n: (grads[0][n], grads[1][n]) for n in grads[0]}


def measure(model, x, y, order):
    """Per block, and summaries: updates over the blocks before the output block (its update
    is backprop's), weight angles over the trained blocks (every block after the stem)."""
    rows = {}
    blocks = dict(dtp_ext.dtp_blocks(model))
    for name, (g, g_bp) in directions(model, x, y).items():
        rows[name] = {
            "update_angle": angle_degrees(g, g_bp),
            "norm_ratio": float(g.norm() / g_bp.norm()),
            "weight_angle": weight_alignment(blocks[name])["angle"],
        }
    summary = {}
    for key, names in (
        ("update_angle", order[:-1]),
        ("norm_ratio", order[:-1]),
        ("weight_angle", order[1:]),
    ):
        values = [rows[n][key] for n in names]
        summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    summary["output_block_angle"] = rows[order[-1]]["update_angle"]
    return summary, rows


def run(name, steps, batch, data, info, lr_rate=None):
    torch.manual_seed(0)
    cfg = resolve(TrainConfig(model=name, algorithm="ldrl", out="unused"))
    if lr_rate is not None:  # another rate for the position-scaled feedback lr
        positions = [
            p for _, p in trained_block_positions(name, info.channels, info.size, info.classes)
        ]
        cfg.feedback_lr = position_scaled_lr(lr_rate, cfg.feedback_noise, positions)
    model = build_model(name, info.channels, info.size, info.classes, cfg.beta)
    order = [n for n, _ in block_positions(model, (info.channels, info.size, info.size))]
    trainer = dtp_ext.FeedbackTrainer(
        model,
        cfg.feedback_iterations,
        cfg.feedback_noise,
        cfg.feedback_lr,
        momentum=cfg.feedback_momentum,
    )

    def images(i, n=batch):
        return (normalise(data.images[i : i + n], info.mean, info.std), data.labels[i : i + n])

    probe = images(32000)
    results, started = [], time.perf_counter()
    summary, rows = measure(model, *probe, order)
    results.append({"warmup_steps": 0, "seconds": 0.0, **summary})
    report(name, results[-1])
    for step in range(1, max(steps) + 1):
        x, _ = images((step - 1) * batch)
        model.train()
        model(x)
        trainer.step()
        if step in steps:
            summary, rows = measure(model, *probe, order)
            results.append(
                {"warmup_steps": step, "seconds": time.perf_counter() - started, **summary}
            )
            report(name, results[-1])
    return {
        "model": name,
        "blocks": len(order),
        "iterations": cfg.feedback_iterations[0],
        "noise": cfg.feedback_noise[0],
        "feedback_lr": dict(zip(order[1:], cfg.feedback_lr)),
        "checkpoints": results,
        "final_blocks": rows,
    }


def report(name, r):
    u, n, w = r["update_angle"], r["norm_ratio"], r["weight_angle"]
    print(
        f"{name:<14}{r['warmup_steps']:>6}{r['seconds']:>8.0f}  update vs BP {u['median']:5.1f}° "
        f"[{u['min']:5.1f}, {u['max']:5.1f}]  norm ratio {n['median']:8.3g} [{n['min']:.3g}, {n['max']:.3g}]"
        f"  weight angle {w['median']:5.1f}° (max {w['max']:5.1f})  output block {r['output_block_angle']:.1e}°",
        flush=True,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--steps", default="5,20", help="warm-up steps at which to measure (comma list)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int)
    p.add_argument(
        "--lr-rate",
        type=float,
        help="feedback lr = RATE / (2 noise^2 P) per block (default: the train command's, 0.01)",
    )
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = sorted(int(s) for s in args.steps.split(","))
    info = INFO["mnist"]
    data = load_split("mnist", None, "train")
    print(
        f"MNIST, batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"{'model':<14}{'warm-up':>6}{'s':>8}  (median [min, max] over blocks; see the docstring)"
    )
    rows = [
        run(name, steps, args.batch, data, info, args.lr_rate) for name in args.models.split(",")
    ]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "batch": args.batch,
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
