"""dtp_ext.loss_scale: tell the DTP blocks that the loss they receive gradients of was scaled.

A DTP block turns its incoming gradient delta into a finite target step beta*B*delta (docs/maths.md §3,
§10), so a loss multiplied by k (GradScaler, a manual scale, 1/n for n accumulated
micro-batches) changes the direction of hidden updates, not only their size. Inside
`with dtp_ext.loss_scale(k):` the blocks divide k out of the step and return k times the
unscaled gradients, exactly as backprop would.

Like torch.autocast, the scale belongs to the thread that enters the block: a CPU backward
runs on the thread that calls it and reads that thread's scale (nested blocks multiply), so
threads scaling different losses at the same time each get their own, in any order of entry and
exit (a torch.compile'd backward reads it at run time too, through an op). Autograd runs a CUDA
backward on its own device threads, which Python did not start: they see the scale of the
threads inside a `loss_scale` block, which must then agree: two threads holding different scales
while such a backward runs is refused, never guessed.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from numbers import Real

import torch

_lock = threading.Lock()
_local = threading.local()  # .factors: this thread's active loss_scale factors, innermost last
_by_thread: dict[int, float] = {}  # product of each thread's active factors (threads with any)
# What threads Python did not start read: the one product all threads agree on (NaN: they
# disagree).
_shared = 1.0


def _as_scale(k) -> float:
    if isinstance(k, torch.Tensor) and k.numel() == 1 and k.is_floating_point():
        k = float(k)
    if isinstance(k, bool) or not isinstance(k, Real) or not math.isfinite(k) or k <= 0:
        raise ValueError(
            f"dtp_ext.loss_scale: k must be a finite number > 0 (the factor the loss "
            f"was multiplied by), got {k!r}"
        )
    return float(k)


def _factors() -> list[float]:
    factors = getattr(_local, "factors", None)
    if factors is None:
        factors = _local.factors = []
    return factors


def _publish(factors: list[float]):
    """Record this thread's product for threads Python did not start, and update theirs."""
    global _shared
    with _lock:
        if factors:
            _by_thread[threading.get_ident()] = math.prod(factors)
        else:
            _by_thread.pop(threading.get_ident(), None)
        values = set(_by_thread.values())
        _shared = values.pop() if len(values) == 1 else (1.0 if not values else math.nan)


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
    factor = _as_scale(k)
    factors = _factors()
    factors.append(factor)
    _publish(factors)
    try:
        yield
    finally:
        factors.pop()
        _publish(factors)


def _started_by_python() -> bool:
    # Threads Python did not start (autograd's device threads) appear as dummy threads.
    return not isinstance(threading.current_thread(), threading._DummyThread)


def current_loss_scale() -> float:
    """The product of this thread's enclosing loss_scale factors (1.0 outside any); on a thread
    Python did not start (autograd's CUDA device threads) that holds none, the scale the
    threads inside a loss_scale block agree on. Its limit: a device thread cannot tell whose
    backward it runs, and a thread outside any block holds nothing it could see, so an
    unscaled CUDA backward on one thread while another thread is inside a block reads that
    block's scale. Run unscaled CUDA backward passes outside other threads' blocks."""
    factors = _factors()
    if factors or _started_by_python():
        return math.prod(factors)
    if math.isnan(_shared):
        with _lock:
            held = sorted(set(_by_thread.values()))
        raise RuntimeError(
            "dtp_ext.loss_scale: autograd runs this backward on its own device thread while "
            f"threads hold different loss scales {held}, so whose loss it is cannot be told; "
            "scale every concurrent backward alike, or run them one after another"
        )
    return _shared
