"""The `dtp-ext` command line: `dtp-ext train` (train.py, its options generated from
TrainConfig by options.py), `dtp-ext figure jmc|gmp` (figure.py) and `dtp-ext presets`
(presets.py). Each command module has `add_parser(sub)` and `run(args) -> exit code`. The
library never imports this package."""

from __future__ import annotations

import argparse

from . import figure, presets, train

COMMANDS = {"train": train, "figure": figure, "presets": presets}


def main(argv: list[str] | None = None) -> int:
    import torch

    from dtp_ext import __version__

    parser = argparse.ArgumentParser(
        prog="dtp-ext",
        description="dtp_ext: difference target propagation with learned backprop targets (L-DRL)",
    )
    parser.add_argument(
        "--version", action="version", version=f"dtp-ext {__version__} (torch {torch.__version__})"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    args = parser.parse_args(argv)
    return COMMANDS[args.command].run(args)
