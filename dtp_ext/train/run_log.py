"""The records of a `dtp-ext train` run in its folder: config.json, metrics.jsonl (a line at
each epoch's end), steps.jsonl (a line every --log-every steps, at each epoch's end and where the
run stops), their TensorBoard mirror (events.py) and the plots drawn from them (plots.py).

Rank 0 alone writes them. A fresh run first removes what an earlier run left in the folder; a
resumed one keeps the lines up to its checkpoint and drops any past it (a crash between a log
line and the checkpoint save), so the records read as those of an uninterrupted run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .events import EventLog, event_files
from .plots import write_plots

# What a run writes in --out (besides the checkpoint and the TensorBoard event files, see
# events.py); a fresh run removes stale copies.
CONFIG_NAME = "config.json"  # the resolved options, written as the run starts
METRICS_NAME = "metrics.jsonl"
STEPS_NAME = "steps.jsonl"
SUMMARY_NAME = "summary.json"  # summary.py
OUTPUTS = (
    CONFIG_NAME,
    METRICS_NAME,
    STEPS_NAME,
    SUMMARY_NAME,
    "accuracy.png",
    "alignment.png",
)


def default_log_every(planned_steps: int) -> int:
    """steps.jsonl interval when --log-every is not given: about 20 lines per run, at most
    every 50 steps (so a 5-step smoke run logs every step)."""
    return max(1, min(50, planned_steps // 20))


def read_records(out: Path, name: str, log: Callable) -> list[dict]:
    """The records of the log `name` a run wrote in `out`, for --resume. These logs are not
    needed to resume: a damaged line (cut short, not a JSON object, not UTF-8, no step/epoch)
    is skipped and named with `log`, never a traceback."""
    path = out / name
    if not path.exists():
        return []
    key = "epoch" if name == METRICS_NAME else "step"
    records, damaged = [], []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            record = None
        if isinstance(record, dict) and type(record.get(key)) is int:
            records.append(record)
        else:
            damaged.append(number)
    if damaged:
        log(
            f"note: {name}: skipped damaged line(s) {', '.join(map(str, damaged))} (not a "
            f"JSON object with an integer '{key}'); the run continues without them"
        )
    return records


def write_records(path: Path, records: list[dict]):
    """`records` as the JSON lines of `path`, replacing it (no empty file where none was)."""
    if not records and not path.exists():
        return
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


@dataclass
class RunLog:
    """Rank 0's records of the run in the folder `out`: `epochs` (metrics.jsonl) and `steps`
    (steps.jsonl) as written so far, and the TensorBoard event log while the run trains."""

    out: Path
    log: Callable  # prints the notes
    epochs: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    events: EventLog | None = None

    @classmethod
    def fresh(cls, out: Path, log: Callable) -> RunLog:
        """A new run's records: what an earlier run wrote in `out` is removed."""
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
        for path in event_files(out):
            path.unlink(missing_ok=True)
        return cls(out, log)

    @classmethod
    def resumed(cls, out: Path, log: Callable, epoch: int, global_step: int) -> RunLog:
        """The records of a run resumed from its checkpoint after `epoch` epochs and
        `global_step` steps; lines past the checkpoint are dropped from the files too."""
        epochs = [r for r in read_records(out, METRICS_NAME, log) if r["epoch"] <= epoch]
        write_records(out / METRICS_NAME, epochs)
        steps = [r for r in read_records(out, STEPS_NAME, log) if r["step"] <= global_step]
        write_records(out / STEPS_NAME, steps)
        return cls(out, log, epochs, steps)

    def start(self, config: dict, tensorboard: bool):
        """What a run writes before its first step: config.json (`config`), and with
        `tensorboard` the event file, holding a resumed run's kept lines (events.py)."""
        (self.out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if tensorboard:
            self.events = EventLog.open(self.out, self.steps, self.epochs, self.log)

    def add_step(self, record: dict):
        """A steps.jsonl line, and its scalars in the event file."""
        self.steps.append(record)
        with open(self.out / STEPS_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.events is not None:
            self.events.write(record)

    def add_epoch(self, record: dict):
        """A metrics.jsonl line, and its scalars in the event file."""
        self.epochs.append(record)
        write_records(self.out / METRICS_NAME, self.epochs)
        if self.events is not None:
            self.events.write(record, epoch=True)

    def plot(self, title: str):
        """accuracy.png and alignment.png from the records so far (plots.py)."""
        write_plots(self.epochs, self.out, title, steps=self.steps)

    def close(self):
        """Closes the event file (the JSONL files are closed after every line)."""
        if self.events is not None:
            self.events.close()
            self.events = None
