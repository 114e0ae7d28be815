"""dtp_ext.loss_scale: tell the DTP blocks that the loss they receive gradients of was scaled.

A DTP block turns its incoming gradient delta into a finite target step beta*B*delta (SPEC §3,
§10), so a loss multiplied by k (GradScaler, a manual scale, 1/n for n accumulated
micro-batches) changes the direction of hidden updates, not only their size. Inside
`with dtp_ext.loss_scale(k):` the blocks divide k out of the step and return k times the
unscaled gradients, exactly as backprop would.

The scale is process-wide, not thread-local, because autograd runs a CUDA backward on its own
device threads; a backward started inside the `with` block sees it on any thread. It is the
product of every `loss_scale` block active in the process: nested blocks multiply, and blocks
that threads enter and leave in any order leave exactly the product of those still active (1.0
once all have left; never a stale value restored out of order).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from collections.abc import Iterator
from numbers import Real

import torch

_lock = threading.Lock()
_active: dict[int, float] = {}  # every active loss_scale block's factor, by entry
_entries = itertools.count()
_scale = 1.0
# The same value as a tensor: a torch.compile'd backward reads this one at run time.
_scale_tensor = torch.ones((), dtype=torch.float64)


def _as_scale(k) -> float:
    if isinstance(k, torch.Tensor) and k.numel() == 1 and k.is_floating_point():
        k = float(k)
    if isinstance(k, bool) or not isinstance(k, Real) or not math.isfinite(k) or k <= 0:
        raise ValueError(
            f"dtp_ext.loss_scale: k must be a finite number > 0 (the factor the loss "
            f"was multiplied by), got {k!r}"
        )
    return float(k)


def _update(enter: tuple[int, float] | None = None, leave: int | None = None):
    """Add or remove one active factor and set the scale to the product of those active."""
    global _scale
    with _lock:
        if enter is not None:
            _active[enter[0]] = enter[1]
        if leave is not None:
            _active.pop(leave, None)
        _scale = math.prod(_active.values())
        _scale_tensor.fill_(_scale)


@contextlib.contextmanager
def loss_scale(k) -> Iterator[None]:
    """Backward passes inside this block come from a loss multiplied by `k`.

    with dtp_ext.loss_scale(k):                       # manual scale
        (k * loss).backward()
    with dtp_ext.loss_scale(scaler.get_scale()):      # torch.amp.GradScaler
        scaler.scale(loss).backward()
    with dtp_ext.loss_scale(1 / n):                   # n accumulated micro-batches
        (loss / n).backward()
    """
    entry = (next(_entries), _as_scale(k))
    _update(enter=entry)
    try:
        yield
    finally:
        _update(leave=entry[0])


def current_loss_scale() -> float:
    """The product of the enclosing loss_scale factors (1.0 outside any)."""
    return _scale


def scale_tensor() -> torch.Tensor:
    """current_loss_scale() as a 0-d float64 CPU tensor, updated in place."""
    return _scale_tensor
