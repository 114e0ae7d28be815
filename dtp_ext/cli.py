"""The `dtp-ext` command line: `dtp-ext train ...` (its options and run: dtp_ext/train/command.py),
`dtp-ext figure jmc|gmp` and `dtp-ext presets`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_figure_parser(sub):
    p = sub.add_parser(
        "figure",
        help="regenerate the paper's JMC or GMP alignment figure",
        description="jmc: train only the output block's feedback on one fixed batch "
        "(L-DRL and DRL) and plot its angle/distance to W^T per iteration. "
        "gmp: per-layer angle between the updates and backprop's gradient "
        "after feedback training (L-DRL, L-DRL with random feedback, DRL). "
        "Writes OUT/<kind>.png and OUT/<kind>.json; about 15 s (jmc) and "
        "40 s (gmp) on MNIST on one core.",
    )
    p.add_argument("kind", choices=("jmc", "gmp"))
    p.add_argument(
        "--dataset",
        choices=("mnist", "fashion-mnist", "cifar10"),
        default="mnist",
        help="mnist (shipped, default) uses mnist-convnet; cifar10 (needs --data-dir) SimpleVGG",
    )
    p.add_argument("--data-dir", metavar="DIR")
    p.add_argument(
        "--iterations", type=int, help="feedback iterations (default 3000 jmc, 1000 gmp)"
    )
    p.add_argument("--batch-size", type=int, default=128, help="the fixed batch (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="runs/figures", metavar="DIR", help="default runs/figures")


def _figure_options(args: argparse.Namespace) -> dict:
    """The figure's options, checked (ConfigError names the argument and what was expected)."""
    from .train import outdir
    from .train.config import ConfigError
    from .train.figures import JMC_EVERY

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


def _run_figure(args: argparse.Namespace) -> int:
    import torch

    from .train.config import ConfigError
    from .train.datasets import DatasetNotFound
    from .train.figures import write_figure

    try:
        options = _figure_options(args)
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


def _run_presets(args: argparse.Namespace) -> int:
    from .train.presets import PRESETS, describe

    width = max(map(len, PRESETS))
    print("presets of dtp-ext train --config NAME (options on the command line override them):")
    for name in sorted(PRESETS):
        print(f"  {name:<{width}}  {describe(name)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import torch

    from . import __version__
    from .train import command

    parser = argparse.ArgumentParser(
        prog="dtp-ext",
        description="dtp_ext: difference target propagation with learned backprop targets (L-DRL)",
    )
    parser.add_argument(
        "--version", action="version", version=f"dtp-ext {__version__} (torch {torch.__version__})"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    command.add_parser(sub)
    _add_figure_parser(sub)
    sub.add_parser(
        "presets",
        help="list the presets of dtp-ext train --config, one line each",
        description="List the presets of `dtp-ext train --config NAME`, one line each.",
    )
    args = parser.parse_args(argv)
    if args.command == "train":
        return command.run(args)
    if args.command == "figure":
        return _run_figure(args)
    if args.command == "presets":
        return _run_presets(args)
    parser.error(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
