"""TensorBoard event files of `dtp-ext train`: what steps.jsonl and metrics.jsonl hold, as
scalars against the optimizer step, in the run folder beside them (`tensorboard --logdir runs`
shows every run). Written by rank 0 when `tensorboard` is installed, unless --no-tensorboard;
without tensorboard the run says so once and trains as before.

Tags: `train/loss`, `train/top1`, `train/top5` (each steps.jsonl line: the mean over the steps
since the previous line), `lr/forward`, `lr/feedback/<block>`, `update_angle/<block>`,
`weight_angle/<block>`, `weight_distance/<block>`, and `feedback_loss/<block>`,
`feedback_quality/<block>/<measure>` as `dtp_ext.log_feedback_report` writes them; at every
epoch's end (metrics.jsonl) `test/loss`, `test/top1`, `test/top5` and the epoch's
`train_epoch/loss`, `train_epoch/top1`, `train_epoch/top5`.

The event files mirror the JSONL: a resumed run replaces them with one rebuilt from the JSONL
lines it keeps (those up to its checkpoint), so nothing is duplicated and nothing past the
checkpoint is left, whatever the previous invocation had written before it stopped (the
rebuilt events carry the resume's wall time; their steps and values are the JSONL's).
"""

from __future__ import annotations

from pathlib import Path

from dtp_ext.tensorboard import as_scalar, feedback_scalars

EVENTS_PREFIX = "events.out.tfevents."  # how SummaryWriter names its files
MISSING = (
    "note: tensorboard is not installed, so this run writes no TensorBoard event files "
    "(pip install tensorboard, or pass --no-tensorboard to say nothing)"
)


def event_files(out: Path) -> list[Path]:
    """The TensorBoard event files in the run folder `out`."""
    return sorted(Path(out).glob(EVENTS_PREFIX + "*"))


def _blocks(value) -> dict:
    """A per-block entry of a record; {} for anything else (a hand-edited line)."""
    return value if isinstance(value, dict) else {}


def _split(record: dict, prefix: str, tag: str) -> dict[str, float]:
    """`<prefix>_loss/top1/top5` of `record` as `<tag>/loss`, ..."""
    found = {}
    for measure in ("loss", "top1", "top5"):
        value = as_scalar(record.get(f"{prefix}_{measure}"))
        if value is not None:
            found[f"{tag}/{measure}"] = value
    return found


def step_scalars(record: dict) -> dict[str, float]:
    """The scalars of one steps.jsonl line."""
    scalars = _split(record, "train", "train")
    lr = as_scalar(record.get("lr"))
    if lr is not None:
        scalars["lr/forward"] = lr
    quality = {}
    for block, row in _blocks(record.get("feedback_quality")).items():
        row = dict(_blocks(row))
        lr = as_scalar(row.pop("lr", None))
        if lr is not None:
            scalars[f"lr/feedback/{block}"] = lr
        quality[block] = row
    scalars.update(feedback_scalars(_blocks(record.get("feedback_loss")), quality))
    for key in ("update_angle", "weight_angle", "weight_distance"):
        for block, value in _blocks(record.get(key)).items():
            value = as_scalar(value)
            if value is not None:
                scalars[f"{key}/{block}"] = value
    return scalars


def epoch_scalars(record: dict) -> dict[str, float]:
    """The scalars of one metrics.jsonl line (the rest of it is in the epoch's steps.jsonl
    line at the same step)."""
    return {**_split(record, "test", "test"), **_split(record, "train", "train_epoch")}


class EventLog:
    """A SummaryWriter on the run folder, flushed after every record so that TensorBoard shows
    what the JSONL shows."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, out: Path, steps: list[dict], epochs: list[dict], log) -> EventLog | None:
        """The event log of the run folder `out`, None (after saying so with `log`) when
        tensorboard is not installed. Event files already there (a resumed run's) are replaced
        by one holding the records `steps` (steps.jsonl) and `epochs` (metrics.jsonl)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log(MISSING)
            return None
        for path in event_files(out):
            path.unlink(missing_ok=True)
        events = cls(SummaryWriter(log_dir=str(out)))
        # The order the run wrote them in: an epoch's metrics.jsonl line before its steps line.
        merged = sorted(
            [(r["step"], 0, i, r) for i, r in enumerate(epochs) if type(r.get("step")) is int]
            + [(r["step"], 1, i, r) for i, r in enumerate(steps)]
        )
        for _, kind, _, record in merged:
            events.write(record, epoch=kind == 0, flush=False)
        events.writer.flush()
        return events

    def write(self, record: dict, epoch: bool = False, flush: bool = True):
        """One steps.jsonl line, or (`epoch`) one metrics.jsonl line."""
        scalars = epoch_scalars(record) if epoch else step_scalars(record)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, record["step"])
        if flush:
            self.writer.flush()

    def close(self):
        self.writer.close()
