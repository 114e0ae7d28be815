"""One training step of converted torchvision models: L-DRL vs backprop, timed in one run.

For resnet18, vgg11_bn, mobilenet_v2 and squeezenet1_1 (torchvision, random weights,
num_classes 10, unmodified architecture), converted with dtp_ext.convert: the number of DTP
blocks, what stayed plain (counts by type, from the conversion report), and the median time of

- an L-DRL step: forward, FeedbackTrainer.step() with a fixed number of iterations per trained
  block (--iterations, default 5), cross-entropy backward (difference targets), SGD step;
- a backprop step of the same network (dtp_ext.reference.backprop_twin: same weights, plain
  autograd): forward, backward, SGD step;

on random 3x32x32 inputs, batch 32 by default. Run:

    python benchmarks/torchvision_step.py [--batch 32] [--iterations 5] [--rounds 3] [--threads N]
                                          [--device cpu|cuda] [--json results/torchvision-step.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import dtp_ext
from dtp_ext.reference import backprop_twin

MODELS = ("resnet18", "vgg11_bn", "mobilenet_v2", "squeezenet1_1")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, rounds, device):
    fn()  # warm-up: allocations, thread pools, momentum buffers
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name, batch, iterations, rounds, device):
    import torchvision

    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(weights=None, num_classes=10)
    model, report = dtp_ext.convert(original, return_report=True)
    del original
    model = model.to(device).train()
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    trainer = dtp_ext.FeedbackTrainer(model, iterations=iterations, noise_std=0.1, lr=1e-4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    twin = backprop_twin(model).train()

    def ldrl_step():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        trainer.step()
        F.cross_entropy(out, y).backward()
        opt.step()

    def bp_step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(twin(x), y).backward()
        opt.step()

    bp = median_time(bp_step, rounds, device)
    ldrl = median_time(ldrl_step, rounds, device)
    return {
        "model": name,
        "blocks": len(report.converted),
        "trained_blocks": len(trainer.blocks),
        "plain": report.left_counts(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "ldrl_step_s": ldrl,
        "bp_step_s": bp,
        "ratio": ldrl / bp,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--iterations", type=int, default=5, help="feedback iterations per trained block"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = (
        torch.cuda.get_device_name(torch.device(args.device))
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        f"converted torchvision models, batch {args.batch} x 3x32x32, 10 classes, L-DRL with "
        f"{args.iterations} feedback iterations per trained block; {args.device} ({device_name}), "
        f"torch {torch.__version__}, median of {args.rounds} rounds"
    )
    print(
        f"{'model':<15}{'blocks':>7}{'params':>11}{'L-DRL s':>10}{'BP s':>9}{'ratio':>8}  plain modules"
    )
    rows = []
    for name in args.models.split(","):
        row = measure(name, args.batch, args.iterations, args.rounds, args.device)
        rows.append(row)
        plain = ", ".join(f"{k} {v}" for k, v in row["plain"].items())
        print(
            f"{name:<15}{row['blocks']:>7}{row['parameters'] / 1e6:>10.1f}M{row['ldrl_step_s']:>10.2f}"
            f"{row['bp_step_s']:>9.3f}{row['ratio']:>7.1f}x  {plain}",
            flush=True,
        )
    if args.json:
        meta = {
            "batch": args.batch,
            "iterations": args.iterations,
            "rounds": args.rounds,
            "device": args.device,
            "device_name": device_name,
            "torch": torch.__version__,
            "build_info": dtp_ext.build_info(),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
