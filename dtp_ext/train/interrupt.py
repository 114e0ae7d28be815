"""Graceful stops of `dtp-ext train`: SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption).

While `stop_signals()` is active the two signals only set a flag; the training loop reads it
at every step boundary (under several processes, inside the step's all-reduce, so every rank
stops after the same step), writes the checkpoint and raises `Interrupted`, which the command
turns into one line saying how to resume and the exit code 128 + signal (130 for SIGINT, 143
for SIGTERM). Further signals while stopping are noted and otherwise ignored: the step in
progress finishes and the checkpoint is written atomically, so nothing is corrupted; SIGKILL
abandons the step in progress and leaves the previous checkpoint intact.

A signal that is ignored when the command starts (`nohup`, a background job of a script) stays
ignored. Outside `stop_signals()` (library use of `Run`) nothing changes: Ctrl-C raises
KeyboardInterrupt as usual.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: int | None = None  # the first signal received while active
_count = 0
_active = False
_announce = True


class Interrupted(Exception):
    """The run stopped at a step boundary on a signal, after writing its checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def name(signum: int) -> str:
    return signal.Signals(signum).name


def requested() -> int | None:
    """The signal number received since `stop_signals()` began, or None."""
    return _received


def agreed(ctx) -> int | None:
    """The signal any rank received, or None: collective under several processes (`ctx`, a
    distributed.Context), every rank gets the same answer; a rank that received none takes
    another rank's as SIGTERM, its usual meaning."""
    signum = requested()
    if not ctx.any(signum is not None):
        return None
    return signum or signal.SIGTERM


def _handler(signum, frame):
    global _received, _count
    _count += 1
    if _received is None:
        _received = signum
        note = (
            f"\ndtp-ext train: {name(signum)} received: stopping at the end of the current step; "
            "the checkpoint will be saved\n"
        )
    else:
        note = (
            f"\ndtp-ext train: {name(signum)} received: already stopping (the step in progress ends, "
            "then the checkpoint is written; SIGKILL would abandon the step, the last checkpoint stays intact)\n"
        )
    if _announce:
        try:  # os.write: safe here, unlike print (the handler may interrupt a print)
            os.write(2, note.encode())
        except OSError:
            pass


@contextlib.contextmanager
def stop_signals(announce: bool = True) -> Iterator[None]:
    """Within the block SIGINT and SIGTERM set the flag `requested()` reads. Only in the main
    thread (Python delivers signals there); elsewhere it changes nothing."""
    global _received, _count, _active, _announce
    if _active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in SIGNALS:
        current = signal.getsignal(sig)
        if current is signal.SIG_IGN:
            continue  # ignored by whoever started us: keep it so
        previous[sig] = current
        signal.signal(sig, _handler)
    _received, _count, _active, _announce = None, 0, True, announce
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _received, _count, _active = None, 0, False
