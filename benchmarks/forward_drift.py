"""How far each DTP block's forward weight moves per step, |W_t - W_t-1| / |W_t|, under
backprop with a network's own optimiser: what decides whether an average of the feedback weight
can follow W (docs/maths.md §7.3, `dtp_ext.averaging.MAX_DRIFT`).

Networks: pytorch/examples' MNIST Net (benchmarks/user_script_mnist.py: Adadelta lr 1.0, batch
64) and the `--model` builds of resnet18 and mobilenet_v2 (SGD lr 0.01, momentum 0.9, batch 32),
converted with the defaults, on consecutive MNIST training batches, seed 0 (one seed). Prints,
per block, the mean drift over steps 1-5, 10-20 and 30-40.

    python benchmarks/forward_drift.py [--steps 40] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import dtp_ext
from dtp_ext.train.batches import normalise
from dtp_ext.train.catalog import build_model
from dtp_ext.train.datasets import INFO, load_split
from user_script_mnist import Net

WINDOWS = ((1, 5), (10, 20), (30, 40))  # steps, 1-based, inclusive


def drifts(model, optimiser, data, info, batch, steps):
    """{block: [drift at step 1, 2, ...]} over `steps` backprop steps."""
    blocks = dtp_ext.dtp_blocks(model)
    previous = {n: b.weight.detach().clone() for n, b in blocks}
    out = {n: [] for n, _ in blocks}
    model.train()
    for i in range(steps):
        x = normalise(data.images[i * batch : (i + 1) * batch], info.mean, info.std)
        y = data.labels[i * batch : (i + 1) * batch]
        loss = F.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        for n, b in blocks:
            w = b.weight.detach()
            out[n].append(float((w - previous[n]).norm() / w.norm()))
            previous[n] = w.clone()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info, data = INFO["mnist"], load_split("mnist", None, "train")
    windows = [(a, b) for a, b in WINDOWS if b <= args.steps]
    print("network, optimiser, block: " + ", ".join(f"steps {a}-{b}" for a, b in windows))

    def user_net():
        net = dtp_ext.convert(Net())
        return net, torch.optim.Adadelta(net.parameters(), lr=1.0), 64

    def torchvision(name):
        def build():
            net = build_model(name, info.channels, info.size, info.classes, 0.7)
            return net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), 32

        return build

    for label, build in (
        ("user Net, Adadelta 1.0", user_net),
        ("resnet18, SGD 0.01", torchvision("resnet18")),
        ("mobilenet_v2, SGD 0.01", torchvision("mobilenet_v2")),
    ):
        torch.manual_seed(0)
        net, optimiser, batch = build()
        for name, values in drifts(net, optimiser, data, info, batch, args.steps).items():
            means = [statistics.mean(values[a - 1 : b]) for a, b in windows]
            print(f"{label}, {name}: " + ", ".join(f"{m:.3g}" for m in means), flush=True)


if __name__ == "__main__":
    main()
