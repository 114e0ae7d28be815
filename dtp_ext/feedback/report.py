"""FeedbackReport: what one FeedbackTrainer.step() did, and the feedback quality it reads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import alignment
from ..metrics import feedback_in_forward_shape, tap_weighted
from ..nn import DTPBlock


@dataclass
class FeedbackReport:
    """What one FeedbackTrainer.step() did: per block, the loss of every iteration, the kernel
    that ran, and (`alignment()`) how its feedback weight stands against its predicted floor."""

    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)  # which compiled kernel ran, by block
    _final_losses: dict[str, float] | None = field(default=None, repr=False)
    # Per block: |V|^2, |W|^2, <V, W>, |A|^2, <A, W> (A the averaged V, else V) as one float64
    # tensor on the block's device (measure_quality), and the block's plan; read on demand by
    # alignment().
    _quality: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    # The same, after each block's previous step (absent at its first): whether |V|/|W| grows.
    _previous: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _plans: dict[str, alignment.BlockPlan] = field(default_factory=dict, repr=False)
    _alignment: dict[str, dict] | None = field(default=None, repr=False)

    def final_losses(self) -> dict[str, float]:
        """The last iteration's loss per block (read by the step's one synchronisation)."""
        if self._final_losses is None:
            self._final_losses = {n: float(l[-1]) for n, l in self.losses.items() if l.numel()}
        return dict(self._final_losses)

    def alignment(self) -> dict[str, dict]:
        """Per block, feedback quality after this step (one device read, on first call):

        - `angle`, `norm_ratio`: the feedback weight targets use (the average, when the trainer
          averages) against W^T, in degrees and |V|/|W|;
        - `raw_angle`, `raw_norm_ratio`: the trained feedback weight V itself;
        - `predicted_angle`, `predicted_norm_ratio`: V's predicted noise floor, 1/cos of it
          (docs/maths.md §7); a raw norm ratio well above it means V is unstable or still
          far from its floor;
        - `status`: "ok", "settling" (raw angle more than 10 degrees above its floor, or
          |V|/|W| above twice the prediction but falling: a V on its way down from a start or
          from an earlier plan's higher floor) or "unstable" (predicted, or |V|/|W| more than
          twice the prediction and not falling since the block's previous step).
        """
        if self._alignment is None:
            names = list(self._quality)
            before = [n for n in names if n in self._previous]
            values = (
                torch.stack(
                    [self._quality[n].to("cpu") for n in names]
                    + [self._previous[n].to("cpu") for n in before]
                ).tolist()
                if names
                else []
            )
            previous = {
                n: _angle_and_ratio(*v[:3])[1] for n, v in zip(before, values[len(names) :])
            }
            self._alignment = {}
            for name, (vv, ww, vw, aa, aw) in zip(names, values):
                plan = self._plans[name]
                raw_angle, raw_ratio = _angle_and_ratio(vv, ww, vw)
                angle, ratio = _angle_and_ratio(aa, ww, aw)
                floor = plan.raw_floor
                high = raw_ratio > 2 * floor.norm_ratio
                if not floor.stable or (high and raw_ratio >= previous.get(name, 0.0)):
                    status = "unstable"
                elif high or raw_angle > floor.angle + 10:
                    status = "settling"
                else:
                    status = "ok"
                self._alignment[name] = {
                    "angle": angle,
                    "norm_ratio": ratio,
                    "raw_angle": raw_angle,
                    "raw_norm_ratio": raw_ratio,
                    "predicted_angle": floor.angle,
                    "predicted_norm_ratio": floor.norm_ratio,
                    "status": status,
                }
        return {n: dict(v) for n, v in self._alignment.items()}


def _angle_and_ratio(vv: float, ww: float, vw: float) -> tuple[float, float]:
    """Angle (degrees) and norm ratio |V|/|W| from |V|^2, |W|^2 and <V, W>."""
    if not (vv > 0 and ww > 0):
        return 90.0, math.sqrt(vv / ww) if ww > 0 else math.inf
    cos = max(-1.0, min(1.0, vw / math.sqrt(vv * ww)))
    return math.degrees(math.acos(cos)), math.sqrt(vv / ww)


@torch.no_grad()
def measure_quality(block: DTPBlock, tap_use=(1.0,)) -> torch.Tensor:
    """|V|^2, |W|^2, <V, W>, |A|^2, <A, W> of `block` (A its averaged feedback weight, else V) as
    one float64 tensor on its device, without a host synchronisation (what
    FeedbackReport.alignment() reads); kernel taps weighed by `tap_use` (its plan's)."""
    # Dot products in the feedback weight's own dtype (no float64 copies: for a wide layer
    # those cost as much as its feedback iterations); <A, .> only where A is not V.
    v = tap_weighted(feedback_in_forward_shape(block, block.feedback_weight), tap_use).reshape(-1)
    w = tap_weighted(block.weight.detach(), tap_use).reshape(-1).to(v.dtype)
    vv, ww, vw = torch.dot(v, v), torch.dot(w, w), torch.dot(v, w)
    a = block.feedback_weight_average
    if a is None:
        aa, aw = vv, vw
    else:
        a = tap_weighted(feedback_in_forward_shape(block, a), tap_use).reshape(-1)
        aa, aw = torch.dot(a, a), torch.dot(a, w)
    return torch.stack([vv, ww, vw, aa, aw]).double()
