"""The feedback settings' rules: the bounds, the one check of per-block values, and the record
of one block's settings (docs/feedback_trainer.md §2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

# Bounds that keep every derived size finite and within the ops' 64-bit integers.
MAX_ITERATIONS = 10**9  # feedback iterations of one block in one step

HYPERPARAMETERS = ("iterations", "noise_std", "lr")

SYNC_MODES = (None, "gradients", "weights", "none")


def finite_real(value) -> bool:
    """A finite real number (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)


def check_per_block(
    name: str,
    value,
    *,
    integer: bool = False,
    owner: str = "FeedbackTrainer",
    planned_entries: bool = False,
):
    """A scalar or a list of per-block values: each finite, >= 0 (whole, and at most
    MAX_ITERATIONS, for iterations), or, `planned_entries`, None in a list (that block's value
    planned). The one check of per-block feedback settings (`dtp-ext train`'s config calls it
    too); errors start with `owner`."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    prefix = f"{owner}: " if owner else ""
    listed = isinstance(value, (list, tuple))
    for v in values:
        if v is None and listed and planned_entries:
            continue
        if v is None and listed:
            raise ValueError(
                f"{prefix}{name} entries must be finite numbers >= 0, got None: a list gives "
                f"every block's {name}; {name}=None plans it for all of them"
            )
        if not finite_real(v) or v < 0:
            raise ValueError(f"{prefix}{name} entries must be finite numbers >= 0, got {v!r}")
        if integer and int(v) != v:
            raise ValueError(f"{prefix}{name} entries must be whole numbers, got {v!r}")
        if integer and v > MAX_ITERATIONS:
            raise ValueError(f"{prefix}{name} entries must be at most {MAX_ITERATIONS}, got {v!r}")
    cast = int if integer else float
    return [None if v is None else cast(v) for v in values] if listed else cast(value)


@dataclass(frozen=True)
class BlockSettings:
    """One block's feedback settings for a step; None: planned (dtp_ext.alignment.plan_feedback)."""

    iterations: int | None = None
    noise_std: float | None = None
    lr: float | None = None
    copies: int = 1  # noise copies of the batch per iteration (planned only)

    def values(self) -> tuple:
        """(iterations, noise_std, lr), in HYPERPARAMETERS' order."""
        return self.iterations, self.noise_std, self.lr
