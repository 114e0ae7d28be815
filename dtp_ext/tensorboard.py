"""A FeedbackReport as TensorBoard scalars: `dtp_ext.log_feedback_report(writer, report, step)`.

The writer is anything with `add_scalar(tag, value, global_step)`: torch.utils.tensorboard's
SummaryWriter (which needs the `tensorboard` package) or tensorboardX's. This module imports
neither, so `import dtp_ext` never needs tensorboard.

Tags, one chart per block (the blocks' names in the model):

- `feedback_loss/<block>`: the last feedback iteration's loss (`report.final_losses()`);
- `feedback_quality/<block>/<measure>`: every number of `report.alignment()`: `angle`,
  `norm_ratio`, `raw_angle`, `raw_norm_ratio`, `predicted_angle`, `predicted_norm_ratio`
  (the predicted noise floor, docs/maths.md §7). Its `status` is a word, not a scalar, and is
  left out.

`dtp-ext train` writes the same tags from its steps.jsonl lines, so a run of the command and a
loop of one's own compare in one TensorBoard.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral, Real

from .trainer import FeedbackReport

__all__ = ["log_feedback_report", "feedback_scalars"]


def as_scalar(value) -> float | None:
    """`value` as a float if it is a real number (not a bool), else None (not a scalar)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    return float(value)


def feedback_scalars(
    losses: Mapping[str, float], quality: Mapping[str, Mapping[str, object]]
) -> dict[str, float]:
    """The tags and values `log_feedback_report` writes, from `losses` (block -> the last
    iteration's loss, `FeedbackReport.final_losses()`) and `quality` (block -> measure -> value,
    `FeedbackReport.alignment()`); entries that are not numbers are left out."""
    scalars = {}
    for block, loss in losses.items():
        value = as_scalar(loss)
        if value is not None:
            scalars[f"feedback_loss/{block}"] = value
    for block, row in quality.items():
        for measure, number in row.items():
            value = as_scalar(number)
            if value is not None:
                scalars[f"feedback_quality/{block}/{measure}"] = value
    return scalars


def log_feedback_report(writer, report, step: int) -> None:
    """Write what one `FeedbackTrainer.step()` reported to `writer` at global step `step`:
    each block's final feedback loss and feedback quality (tags: see this module). The report
    keeps what it read from the device, so calling its methods again costs nothing."""
    if not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(
            f"log_feedback_report: writer must have an add_scalar method (a "
            f"torch.utils.tensorboard.SummaryWriter), got {type(writer).__name__}"
        )
    if not isinstance(report, FeedbackReport):
        raise TypeError(
            f"log_feedback_report: report must be the FeedbackReport that "
            f"FeedbackTrainer.step() returns, got {type(report).__name__}"
        )
    if isinstance(step, bool) or not isinstance(step, Integral) or step < 0:
        raise ValueError(
            f"log_feedback_report: step must be a whole number >= 0 (the global step), got {step!r}"
        )
    for tag, value in feedback_scalars(report.final_losses(), report.alignment()).items():
        writer.add_scalar(tag, value, int(step))
