"""Per block: its successful steps and its forward weight's versions, for the warm start, the
feedback averages and the warning about forward updates before any feedback training
(docs/feedback_trainer.md §3, §5; docs/maths.md §7.3, §7.5)."""

from __future__ import annotations

import zlib

import torch

from .. import alignment
from ..averaging import FeedbackAverages
from ..nn import DTPBlock
from ..user_warnings import warn_at_caller


def weight_version(block: DTPBlock) -> int:
    """The forward weight's in-place version counter (an optimizer step bumps it)."""
    return block.weight._version


def weight_digest(block: DTPBlock) -> int:
    """A checksum of the forward weight's bytes: equal after a save and a load whatever the
    order the model and the trainer are loaded in (loading bumps the version counter)."""
    w = block.weight.detach().contiguous()
    return zlib.crc32(w.view(torch.uint8).cpu().numpy())


class BlockHistory:
    """What the trainer remembers of each block across steps: its step count, its forward
    weight's version at construction (whether W was updated before its feedback was ever
    trained) and at the end of its latest step (whether W moved since)."""

    def __init__(self, model_blocks: list):
        self.model_blocks = model_blocks
        self.steps: dict[str, int] = {}
        self._initial_versions = {n: weight_version(b) for n, b in model_blocks}
        self._versions: dict[str, int] = {}  # at the end of each block's latest step
        # After load_state_dict: {name: (moved when saved, the weight's digest when saved)},
        # read at the next step (the model may be loaded after the trainer).
        self._loaded: dict[str, tuple[bool, int]] = {}
        self._warned_untrained = False

    def warm_start_pending(self, name: str, warm_start: bool, plans) -> int:
        """Extra iterations a block runs before this step's: its warm start (its plan's, from
        `plans` by name), at its first step."""
        if not warm_start or self.steps.get(name, 0):
            return 0
        return plans[name].warm_start_iterations

    def _settle_loaded(self):
        """The versions of blocks whose state was loaded: a block counts as moved when it had
        moved when saved or its forward weight's bytes differ from the saved ones."""
        if not self._loaded:  # every step after the first one after a load
            return
        for n, b in self.model_blocks:
            if n in self._loaded:
                moved, digest = self._loaded.pop(n)
                moved = moved or weight_digest(b) != digest
                self._versions[n] = -1 if moved else weight_version(b)

    def forward_still(self, trained) -> bool:
        """Whether no trained block's forward weight moved since that block's latest step, each
        having stepped before: a feedback-only step (a warm-up before training)."""
        self._settle_loaded()
        return all(self._versions.get(t.name) == weight_version(t.block) for t in trained) and bool(
            trained
        )

    def warn_untrained_feedback(self, trained):
        """Warn once when a block's forward weights were updated before its feedback weights
        were ever trained: those updates used a random feedback weight's targets."""
        for t in trained:
            if self.steps.get(t.name, 0) or self._warned_untrained:
                continue
            if weight_version(t.block) != self._initial_versions.get(t.name):
                self._warned_untrained = True
                warn_at_caller(
                    f"FeedbackTrainer: the forward weights of block {t.name!r} were updated before "
                    "its feedback weights were trained: those updates followed targets from a "
                    "random feedback weight (angles near 90° to backprop). Call trainer.step() "
                    "between model(x) and loss.backward(), or train the feedback alone first "
                    "(model(x); trainer.step() for a few batches, no optimizer step)",
                )

    @torch.no_grad()
    def record_step(
        self,
        name: str,
        block: DTPBlock,
        plan: alignment.BlockPlan,
        averages: FeedbackAverages | None,
        warm_start: bool,
    ):
        """A successful step's bookkeeping for one block: its step count and its average (after
        the burn-in: none after a warm start, else its transient)."""
        self._settle_loaded()
        steps = self.steps[name] = self.steps.get(name, 0) + 1
        version = weight_version(block)
        moved = self._versions.get(name, version) != version
        self._versions[name] = version
        burn_in = 0 if warm_start else plan.transient_steps
        if averages is not None and steps > burn_in:
            averages.update(name, block, plan.noise_per_step, moved)

    def state_dict(self) -> dict:
        """Each block's steps, and whether its forward weight moved since its latest step (the
        next step treats its average accordingly; docs/maths.md §7.3) and a digest of its
        forward weight, which tells the resumed trainer whether W moved since the save."""
        self._settle_loaded()
        known = [(n, b) for n, b in self.model_blocks if n in self._versions]
        return {
            "block_steps": dict(self.steps),
            "forward_moved": {n: weight_version(b) != self._versions[n] for n, b in known},
            "forward_digest": {n: weight_digest(b) for n, b in known},
        }

    def load_state_dict(self, block_steps: dict, forward_moved: dict, digests: dict | None):
        self.steps = {n: int(v) for n, v in block_steps.items()}
        names = {n for n, _ in self.model_blocks}
        if digests:
            # Read at the next step, against the weights the model holds by then.
            self._versions = {}
            self._loaded = {
                n: (bool(forward_moved[n]), int(digests[n]))
                for n in forward_moved
                if n in names and n in digests
            }
            return
        # A state without digests (older versions): versions start afresh; a block whose W had
        # moved when saved counts as moved at its next step (-1: no version matches).
        self._loaded = {}
        self._versions = {
            n: -1 if forward_moved[n] else weight_version(b)
            for n, b in self.model_blocks
            if n in forward_moved
        }
