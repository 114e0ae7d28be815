"""Warnings attributed to the user's code: the first caller outside dtp_ext and torch."""

from __future__ import annotations

import os
import sys
import warnings

import torch

_INTERNAL = tuple(
    os.path.dirname(os.path.abspath(module.__file__)) + os.sep
    for module in (sys.modules[__package__], torch)
)


def warn_at_caller(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """warnings.warn(message, category) with the file and line of the first frame outside this
    package and torch (whose decorators, such as torch.no_grad, wrap the public methods), so a
    warning names the user's call whichever internal path raised it."""
    frame, level = sys._getframe(1), 2  # stacklevel 2 is warn_at_caller's caller
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
