"""`dtp-ext figure jmc|gmp`: its options, their checks, and the run that writes the paper's
alignment figure (the figures themselves: dtp_ext/train/figures.py)."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from dtp_ext.train import outdir
from dtp_ext.train.catalog import DEFAULT_MODEL
from dtp_ext.train.config import ConfigError, by_value
from dtp_ext.train.datasets import DatasetNotFound
from dtp_ext.train.figures import JMC_EVERY, gmp, jmc, write_figure

from .formatting import HelpFormatter

DATASETS = ("mnist", "fashion-mnist", "cifar10")
FIGURES = {"jmc": jmc, "gmp": gmp}


def _default(name: str, figure: str):
    return inspect.signature(FIGURES[figure]).parameters[name].default


def add_parser(sub):
    """The `figure` subcommand on the subparsers `sub` of the top-level parser."""
    p = sub.add_parser(
        "figure",
        help="regenerate the paper's JMC or GMP alignment figure",
        description="jmc: train only the output block's feedback on one fixed batch "
        "(L-DRL and DRL) and plot its angle/distance to W^T per iteration. "
        "gmp: per-layer angle between the updates and backprop's gradient "
        "after feedback training (L-DRL, L-DRL with random feedback, DRL). "
        "Writes OUT/<kind>.png and OUT/<kind>.json; about 15 s (jmc) and "
        "40 s (gmp) on MNIST on one core.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("kind", choices=tuple(FIGURES))
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=_default("dataset", "jmc"),
        help="mnist is shipped, the others need --data-dir; the model: "
        + by_value({d: DEFAULT_MODEL[d] for d in DATASETS}),
    )
    p.add_argument("--data-dir", metavar="DIR")
    p.add_argument(
        "--iterations",
        type=int,
        help="feedback iterations (default: "
        + ", ".join(f"{_default('iterations', f)} for {f}" for f in FIGURES)
        + ")",
    )
    p.add_argument(
        "--batch-size", type=int, default=_default("batch_size", "jmc"), help="the fixed batch"
    )
    p.add_argument("--seed", type=int, default=_default("seed", "jmc"), help="random seed")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="runs/figures", metavar="DIR", help="output folder")
    return p


def _options(args: argparse.Namespace) -> dict:
    """The figure's options, checked (ConfigError names the argument and what was expected)."""
    if args.batch_size < 1:
        raise ConfigError(
            f"--batch-size must be >= 1 (images in the fixed batch), got {args.batch_size}"
        )
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    options = {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    if args.iterations is not None:
        if args.kind == "jmc" and (args.iterations < JMC_EVERY or args.iterations % JMC_EVERY):
            raise ConfigError(
                f"--iterations for jmc must be a positive multiple of {JMC_EVERY} (the figure "
                f"measures the alignment every {JMC_EVERY} iterations), got {args.iterations}"
            )
        if args.iterations < 1:
            raise ConfigError(f"--iterations must be >= 1, got {args.iterations}")
        options["iterations"] = args.iterations
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise ConfigError(f"--data-dir {args.data_dir}: not an existing folder")
    outdir.check(args.out)
    return options


def run(args: argparse.Namespace) -> int:
    """Runs `dtp-ext figure` as parsed by `add_parser`; returns the exit code."""
    import torch

    try:
        options = _options(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        data = write_figure(args.kind, Path(args.out), **options)
    except (ConfigError, DatasetNotFound) as exc:
        print(f"dtp-ext figure: error: {exc}", file=sys.stderr)
        return 2
    if args.kind == "jmc":
        print(
            f"JMC ({data['model']}, block {data['block']}): after {data['iteration'][-1]} iterations "
            f"L-DRL angle {data['ldrl_angle'][-1]:.1f} deg, DRL angle {data['drl_angle'][-1]:.1f} deg"
        )
    else:
        for variant, angles in data["angles"].items():
            print(f"GMP {variant:<12}" + "  ".join(f"{n} {a:5.1f}" for n, a in angles.items()))
    print(f"wrote {args.out}/{args.kind}.png and {args.kind}.json")
    return 0
