"""A user's own MNIST script, trained by backprop and by L-DRL converted as the README shows.

The network is pytorch/examples' MNIST `Net` (two convs and two linears, F.relu, F.max_pool2d
and dropout applied in forward(), log-softmax output), its optimiser (Adadelta, lr 1.0) and
batch (64). The L-DRL run changes three lines: `model = dtp_ext.convert(model)`,
`trainer = dtp_ext.FeedbackTrainer(model)` (the defaults, nothing tuned), and
`trainer.step()` between the forward pass and `loss.backward()`. Both runs start from the same
weights and see the same batches; one epoch of the shipped MNIST each, then test top-1.

    python benchmarks/user_script_mnist.py [--epochs 1] [--steps N] [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

import dtp_ext
from dtp_ext.train.batches import normalise
from dtp_ext.train.datasets import INFO, load_split


class Net(nn.Module):  # pytorch/examples mnist/main.py, unchanged
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def train(model, data, info, batch, steps, use_dtp, seed):
    trainer = dtp_ext.FeedbackTrainer(model) if use_dtp else None
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)  # the same dropout masks stream for both runs
    model.train()
    start = time.perf_counter()
    losses = []
    for step in range(steps):
        idx = order[step * batch : (step + 1) * batch]
        x = normalise(data.images[idx], info.mean, info.std)
        out = model(x)
        if trainer is not None:
            trainer.step()
        loss = F.nll_loss(out, data.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    return losses, seconds, trainer


@torch.no_grad()
def accuracy(model, test, info):
    model.eval()
    correct = 0
    for i in range(0, len(test), 1000):
        x = normalise(test.images[i : i + 1000], info.mean, info.std)
        correct += int((model(x).argmax(1) == test.labels[i : i + 1000]).sum())
    return 100.0 * correct / len(test)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, help="steps per run (default: one epoch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from conftest import cpu_features

    info = INFO["mnist"]
    data, test = load_split("mnist", None, "train"), load_split("mnist", None, "test")
    steps = args.steps or len(data) // args.batch
    torch.manual_seed(args.seed)
    base = Net()
    result = {"batch": args.batch, "steps": steps, "seed": args.seed, "cpu": cpu_features()}
    print(
        f"MNIST, pytorch/examples Net, batch {args.batch}, {steps} steps, seed {args.seed} (one seed)"
    )
    print(cpu_features())
    for kind in ("backprop", "ldrl"):
        model = copy.deepcopy(base)
        if kind == "ldrl":
            model = dtp_ext.convert(model)
        losses, seconds, trainer = train(
            model, data, info, args.batch, steps, kind == "ldrl", args.seed
        )
        top1 = accuracy(model, test, info)
        result[kind] = {
            "test_top1": top1,
            "seconds": seconds,
            "first_loss": losses[0],
            "last_loss": sum(losses[-50:]) / len(losses[-50:]),
        }
        print(
            f"{kind:<9} test top-1 {top1:.2f} %  train loss {losses[0]:.3f} -> {result[kind]['last_loss']:.3f} (last 50)  {seconds:.0f} s",
            flush=True,
        )
        if trainer is not None:
            print(trainer.explain())
    print(
        f"L-DRL - backprop: {result['ldrl']['test_top1'] - result['backprop']['test_top1']:+.2f} points"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
