"""Feedback weights averaged over steps, for the targets (docs/maths.md §7.3).

At a constant lr a feedback weight V does not converge: it fluctuates around W^T at its noise
floor. Its average over steps is much closer to W^T (the fluctuations average out), so targets
use the average while the feedback loop keeps training V itself. While the forward weight W
stays put (a feedback-only warm-up) the average is the plain mean of every step's V. Once W
moves, an average over n steps lags it by ~n/2 steps: a systematic error that grows as n^2
while the noise falls as 1/n. Each step therefore measures how far W moved (drift^2 =
|W_t - W_t-1|^2 / |W_t|^2, its own forward weight, one pass) and caps the window at
n* = (noise / drift^2)^(1/3), where the two errors balance (`noise`: tan^2 of the raw V's
floor over its per-step averaging gain, from the block's plan), and at 1 / (1 - decay) steps.
Everything stays on the weights' device: no synchronisation.
"""

from __future__ import annotations

import torch

# Above this drift per step (|W_t - W_t-1| / |W_t|) a block's targets use V itself
# (docs/maths.md §7.3).
MAX_DRIFT = 0.02


class FeedbackAverages:
    """Per block: the average of its feedback weight, the steps it holds (a window), and the
    forward weight at the previous step (to measure its drift)."""

    def __init__(self, decay: float):
        self.decay = float(decay)
        self.weights: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.previous: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, name: str, block, noise: float, moved: bool):
        """Add the block's current feedback weight to its average and point the block's
        `feedback_weight_average` (what its targets use) at it. `moved`: whether the forward
        weight changed since the block's previous step (its version counter: no device read);
        with decay 0 the average is then dropped and targets use V itself, at no cost."""
        v, w = block.feedback_weight, block.weight.detach()
        if moved and self.decay == 0:
            self.forget(name, block)
            return
        average = self.weights.get(name)
        if average is None or average.shape != v.shape or average.device != v.device:
            self.weights[name] = v.detach().clone()
            self.counts[name] = torch.ones((), dtype=torch.float64, device=v.device)
            self.previous[name] = w.clone()
            block.feedback_weight_average = self.weights[name]
            return
        previous = self.previous[name]
        drift2 = (w - previous).double().pow(2).sum() / w.double().pow(2).sum().clamp_min(1e-300)
        # Where lag and noise balance, capped by the decay; none (V itself) where W moved more
        # than MAX_DRIFT: fast training follows a lagging average badly, measurably so even
        # for a window of two steps (docs/maths.md §7.3).
        window = (noise / drift2).pow(1 / 3).clamp(1.0, 1.0 / (1.0 - self.decay))
        window = torch.where(drift2 > MAX_DRIFT**2, torch.ones_like(window), window)
        count = self.counts[name] + 1
        count = torch.where(drift2 > 0, torch.minimum(count, window), count)
        self.counts[name] = count
        average.lerp_(v, count.reciprocal().to(average.dtype))
        previous.copy_(w)
        block.feedback_weight_average = average

    def forget(self, name: str, block):
        for store in (self.weights, self.counts, self.previous):
            store.pop(name, None)
        block.feedback_weight_average = None

    def steps(self, name: str) -> float:
        """The steps the block's average holds now (a device read)."""
        count = self.counts.get(name)
        return 0.0 if count is None else float(count)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "weights": {n: w.clone() for n, w in self.weights.items()},
            "counts": {n: c.clone() for n, c in self.counts.items()},
            "previous": {n: w.clone() for n, w in self.previous.items()},
        }

    def load_state_dict(self, state: dict, blocks: dict):
        """Restore the averages of `blocks` ({name: block}) and point those blocks at them;
        everything is checked before anything is replaced."""
        weights = state.get("weights", {})
        counts, previous = state.get("counts", {}), state.get("previous", {})
        for name, w in weights.items():
            block = blocks.get(name)
            if block is None:
                raise ValueError(
                    f"FeedbackTrainer.load_state_dict: feedback average of {name!r}, which this "
                    f"trainer does not train (it trains {sorted(blocks)})"
                )
            if w.shape != block.feedback_weight.shape:
                why = f"average {tuple(w.shape)}, expected {tuple(block.feedback_weight.shape)}"
            elif name not in counts or name not in previous:
                missing = [
                    k for k, d in (("counts", counts), ("previous", previous)) if name not in d
                ]
                why = f"the state has no {' or '.join(missing)} entry for it: a damaged state"
            elif previous[name].shape != block.weight.shape:
                why = (
                    f"previous forward weight {tuple(previous[name].shape)}, expected "
                    f"{tuple(block.weight.shape)}"
                )
            else:
                continue
            raise ValueError(
                f"FeedbackTrainer.load_state_dict: feedback average of {name!r} does not fit the "
                f"block ({why})"
            )
        self.weights, self.counts, self.previous = {}, {}, {}
        for name, w in weights.items():
            block = blocks[name]
            v, fw = block.feedback_weight, block.weight
            self.weights[name] = w.to(device=v.device, dtype=v.dtype).clone()
            self.counts[name] = torch.as_tensor(counts[name], dtype=torch.float64).to(v.device)
            self.previous[name] = previous[name].to(device=fw.device, dtype=fw.dtype).clone()
            block.feedback_weight_average = self.weights[name]
