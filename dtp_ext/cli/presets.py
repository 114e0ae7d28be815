"""`dtp-ext presets`: the presets of `dtp-ext train --config NAME`, one line each."""

from __future__ import annotations

import argparse

from dtp_ext.train.presets import PRESETS, describe


def add_parser(sub):
    """The `presets` subcommand on the subparsers `sub` of the top-level parser."""
    return sub.add_parser(
        "presets",
        help="list the presets of dtp-ext train --config, one line each",
        description="List the presets of `dtp-ext train --config NAME`, one line each.",
    )


def run(args: argparse.Namespace) -> int:
    width = max(map(len, PRESETS))
    print("presets of dtp-ext train --config NAME (options on the command line override them):")
    for name in sorted(PRESETS):
        print(f"  {name:<{width}}  {describe(name)}")
    return 0
