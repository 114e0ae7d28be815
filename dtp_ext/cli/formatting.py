"""How the commands' --help prints: each option's help followed by its default (argparse's
ArgumentDefaultsHelpFormatter), except where the default is None, whose help says what it means."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help and its default; the description and epilog wrapped."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """Every option's help and its default; the description and epilog as written."""
