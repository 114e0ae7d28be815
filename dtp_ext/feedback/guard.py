"""The divergence guard: a step is kept whole or every block's feedback state is restored
(docs/feedback_trainer.md §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..nn import DTPBlock


@dataclass
class BlockRun:
    """One block's part of a step: its momentum buffers, its feedback state before the step
    (to restore) and, once its loop ran, the losses of every iteration."""

    name: str
    block: DTPBlock
    buffers: dict[str, torch.Tensor]
    saved: tuple[torch.Tensor, ...]
    losses: torch.Tensor | None = None

    @classmethod
    def start(cls, name: str, block: DTPBlock, buffers: dict[str, torch.Tensor]) -> BlockRun:
        """The run of `block` with its state saved before its loop writes it."""
        run = cls(name, block, buffers, ())
        run.saved = tuple(t.clone() for t in run.state())
        return run

    def state(self) -> tuple[torch.Tensor, ...]:
        """What the feedback loop updates in place: the feedback weight and bias and their
        momentum buffers."""
        b = self.block
        return b.feedback_weight, b.feedback_bias, self.buffers["weight"], self.buffers["bias"]

    def restore(self):
        for target, value in zip(self.state(), self.saved):
            target.copy_(value)


def restore(runs: list[BlockRun]):
    """Every run's block back to its state before the step."""
    for run in runs:
        run.restore()


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether every element of `t` is finite, a 0-dim bool tensor, in one pass with no
    temporary of t's size (its extremes are finite exactly when every element is)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    low, high = torch.aminmax(t)
    return torch.isfinite(low) & torch.isfinite(high)


def refuse_divergence(runs: list[BlockRun], max_growth: float | None) -> dict[str, float]:
    """A step in which any block produced a non-finite loss or weight, or feedback weights that
    grew more than `max_growth` times (relative to the larger of their norm before the step and
    the forward weight's), is reported with the block (and the iteration), never kept: raises
    FloatingPointError, and the caller restores every block. Also raises the ops' deferred
    non-finite input flags (CUDA). One device synchronisation per step; returns each block's
    last loss."""
    if not runs:
        return {}
    target = runs[0].losses.device  # one device and dtype for the single read
    checks, devices = [], []
    for run in runs:
        block, losses = run.block, run.losses
        finite = (
            all_finite(losses) & all_finite(block.feedback_weight) & all_finite(block.feedback_bias)
        )
        reference = torch.maximum(run.saved[0].norm(), block.weight.detach().norm())
        growth = block.feedback_weight.norm() / reference
        last = losses[-1] if losses.numel() else growth.new_zeros(())
        # (a model may span devices)
        checks.append(
            torch.stack([finite.to(growth.dtype), growth, last.to(growth.dtype)]).to(
                device=target, dtype=torch.float64
            )
        )
        if losses.device not in devices:
            devices.append(losses.device)
    # Deferred finite checks (CUDA): the flags the ops set since the last step.
    flags = [(d, ops.pending_non_finite(d)) for d in devices]
    flags = [(d, f) for d, f in flags if f is not None]
    values = torch.cat(
        [torch.stack(checks).flatten()]
        + [f.to(device=target, dtype=torch.float64).reshape(1) for _, f in flags]
    ).tolist()  # the one sync
    codes = values[3 * len(checks) :]
    for (device, _), code in zip(flags, codes):
        if code:
            ops.clear_non_finite(device)
            op = ops.non_finite_op(int(code))
            raise FloatingPointError(
                f"FeedbackTrainer.step: {op} received a non-finite input (NaN or Inf) during this "
                "step or the backward pass before it (a deferred check); every block's feedback "
                "weights and momentum were restored to their values before this step"
                + (
                    "; the forward weights' last gradients were not finite either: restore them "
                    "from a checkpoint"
                    if op in ("dtp_ext.propagate_target", "dtp_ext.block_weight_grad")
                    else ""
                )
            )
    values = [values[3 * i : 3 * i + 3] for i in range(len(checks))]
    for run, (finite, growth, _) in zip(runs, values):
        name, block, losses = run.name, run.block, run.losses
        if not finite:
            bad = (~torch.isfinite(losses)).nonzero()
            where = f"iteration {int(bad[0])}" if bad.numel() else "its final update"
            hint = (
                "its recorded input is not finite"
                if not torch.isfinite(block.recorded_input).all()
                else "lower its feedback lr or noise_std"
            )
            raise FloatingPointError(
                f"FeedbackTrainer.step: block {name!r} diverged (non-finite loss or weights at "
                f"{where}); every block's feedback weights and momentum were restored to their "
                f"values before this step ({hint})"
            )
        if max_growth is not None and not growth <= max_growth:
            raise FloatingPointError(
                f"FeedbackTrainer.step: block {name!r} diverged: its feedback weight's norm grew "
                f"{growth:.3g} times in one step (from {float(run.saved[0].norm()):.3g} to "
                f"{float(block.feedback_weight.norm()):.3g}, more than max_growth={max_growth:g} "
                f"times the larger of that and its forward weight's norm); every block's feedback "
                "weights and momentum were restored to their values before this step (lower its "
                "feedback lr or noise_std, or warm the feedback up first)"
            )
    return {run.name: last for run, (_, _, last) in zip(runs, values) if run.losses.numel()}
