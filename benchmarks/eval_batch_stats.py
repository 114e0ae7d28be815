"""Test accuracy of a `dtp-ext train` run's checkpoint with BatchNorm's running statistics
(eval mode, what the run reports) and with each test batch's own statistics.

After a short run the running statistics (momentum 0.1) lag behind weights that are still
moving fast, so eval-mode accuracy can sit far below what the weights do on a batch; the
second number separates the two. Nothing is written.

    python benchmarks/eval_batch_stats.py RUN_DIR [RUN_DIR ...] [--batch 500]
"""

from __future__ import annotations

import argparse

import torch

from dtp_ext.train import checkpoint as ckpt
from dtp_ext.train.batches import normalise
from dtp_ext.train.catalog import build_model
from dtp_ext.train.datasets import INFO, load_split


@torch.no_grad()
def accuracy(model, data, info, batch, batch_stats: bool) -> float:
    model.train(batch_stats)  # training-mode BatchNorm normalises with the batch's statistics
    hits = 0
    for i in range(0, len(data), batch):
        x = normalise(data.images[i : i + batch], info.mean, info.std)
        hits += int((model(x).argmax(1) == data.labels[i : i + batch]).sum())
    return 100 * hits / len(data)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--batch", type=int, default=500)
    args = p.parse_args(argv)
    for run in args.runs:
        state = ckpt.load(run)
        cfg = ckpt.saved_config(state, run)
        info = INFO[cfg.dataset]
        data = load_split(cfg.dataset, cfg.data_dir, "test").subset(cfg.test_subset)
        results = []
        for batch_stats in (False, True):  # a fresh model each time: running stats untouched
            model = build_model(cfg.model, info.channels, info.size, info.classes, cfg.beta)
            model.load_state_dict(state["model"])
            results.append(accuracy(model, data, info, args.batch, batch_stats))
        print(
            f"{run}: step {state['global_step']}, test top-1 {results[0]:.2f}% with running "
            f"statistics, {results[1]:.2f}% with batch statistics (batches of {args.batch})"
        )


if __name__ == "__main__":
    main()
