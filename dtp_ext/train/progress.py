"""Where a `dtp-ext train` run stands: its epoch and step counters, its training time and the
train metrics gathered over the epoch and since the last steps.jsonl line. All of it is in the
checkpoint (run_state.py), so a resumed run continues the counts where they stopped."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import TrainConfig
from .distributed import StepTotals
from .evaluation import RunningTotals


@dataclass
class Progress:
    """The counters of a run. `global_step` counts the optimizer steps taken since the run
    began (a refused step does not count); `elapsed` the seconds spent in the training loop,
    the epochs' evaluations excluded."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps of the current epoch completed
    global_step: int = 0
    elapsed: float = 0.0
    counter: RunningTotals = field(default_factory=RunningTotals)  # the epoch's train metrics
    # The train metrics since the last regular steps.jsonl line, and over how many steps.
    window: RunningTotals = field(default_factory=RunningTotals)
    window_steps: int = 0

    def count_step(self, totals: StepTotals):
        """An optimizer step taken, with its loss and hits summed over the ranks."""
        for running in (self.counter, self.window):
            running.add_totals(totals.loss_sum, totals.top1, totals.top5, totals.seen)
        self.window_steps += 1
        self.global_step += 1

    def reset_window(self):
        """A regular steps.jsonl line was written: the next one counts from here."""
        self.window, self.window_steps = RunningTotals(), 0

    def next_epoch(self):
        self.epoch, self.step_in_epoch, self.counter = self.epoch + 1, 0, RunningTotals()

    def load_state_dict(self, state: dict):
        """The counters of a checkpoint (checked by checkpoint.check_counters). Raises KeyError,
        TypeError or ValueError for a malformed one."""
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step, self.elapsed = int(state["global_step"]), float(state["elapsed"])
        self.counter = RunningTotals(state["counter"])
        window = state.get("window") or {}  # absent from checkpoints of older versions
        self.window, self.window_steps = (
            RunningTotals(window.get("counter")),
            int(window.get("steps", 0)),
        )

    def at_step(self) -> str:
        """Where a refused step was ("at step N (epoch E)"), for its message."""
        return f"at step {self.global_step} (epoch {self.epoch + 1})"

    def where(self, steps_per_epoch: int) -> str:
        """Where a stopped run stands ("step N (epoch E, step S of P)")."""
        return (
            f"step {self.global_step} (epoch {self.epoch + 1}, step {self.step_in_epoch} of "
            f"{steps_per_epoch})"
        )

    def position(self, epochs: int, steps_per_epoch: int) -> str:
        """How far through its epochs the run is, for the line a resumed run starts with."""
        if self.step_in_epoch == 0:
            return f"{self.epoch} of {epochs} epoch(s) done"
        return f"epoch {self.epoch + 1}, {self.step_in_epoch} of its {steps_per_epoch} steps done"

    def nothing_left(self, cfg: TrainConfig, steps_per_epoch: int) -> str | None:
        """Why a (resumed) run has no step left to train, or None."""
        if self.epoch >= cfg.epochs:
            return (
                f"the run has completed {self.epoch} epoch(s) and --epochs is {cfg.epochs}; pass a larger "
                "--epochs to train further"
            )
        if (
            cfg.max_steps is not None
            and self.global_step >= cfg.max_steps
            and self.step_in_epoch < steps_per_epoch
        ):
            return (
                f"the run is at step {self.global_step} and --max-steps {cfg.max_steps} counts the run's "
                "steps from its start, not this invocation's; pass a larger --max-steps, or none to train "
                f"to the end of epoch {cfg.epochs}"
            )
        return None
