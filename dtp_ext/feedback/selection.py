"""Which of a model's DTP blocks a FeedbackTrainer step trains, in what order, why the others are
skipped, and the per-block settings bound to them (docs/feedback_trainer.md §1-§2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..nn import DTPBlock, forward_clock
from .settings import HYPERPARAMETERS, BlockSettings, check_per_block


@dataclass(frozen=True)
class TrainedBlock:
    """One block a step trains, with its settings for the step."""

    name: str
    block: DTPBlock
    settings: BlockSettings


def select_blocks(named, blocks: Sequence) -> list:
    """[(name, block)] for `blocks` (DTP blocks of the model or their names), in that order."""
    by_name = dict(named)
    by_module = {id(m): n for n, m in named}
    chosen = []
    for b in blocks:
        if isinstance(b, str):
            if b not in by_name:
                raise ValueError(
                    f"FeedbackTrainer: blocks names {b!r}, which is not a DTP block "
                    f"of the model (those are {list(by_name)})"
                )
            chosen.append((b, by_name[b]))
        elif id(b) in by_module:
            chosen.append((by_module[id(b)], b))
        else:
            raise ValueError(
                "FeedbackTrainer: blocks must hold DTP blocks of the model or their names"
            )
    names = [n for n, _ in chosen]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"FeedbackTrainer: blocks lists {duplicates} more than once; each block "
            "has one feedback loop per step"
        )
    return chosen


class BlockSelection:
    """The trained blocks of a model and their settings.

    `model_blocks`: [(name, block)] of every DTP block of the model; `blocks`: None (the data
    flow of the latest training forward pass decides, docs/maths.md §5) or the blocks to train,
    in that order. The settings (`set`/`get`, one per name in HYPERPARAMETERS) are each None
    (planned), a scalar or a list with one entry per trained block, bound by name the first
    time the trained blocks are known.
    """

    def __init__(self, model_blocks: list, blocks: Sequence | None = None):
        self.model_blocks = model_blocks
        self.chosen = None if blocks is None else select_blocks(model_blocks, blocks)
        self._spec: dict = {}  # hyperparameter -> None, a scalar or a per-block list
        self.bound: list | None = None  # [(name, block)] the lists are bound to
        self._settings: dict[str, BlockSettings] = {}  # by block name
        # The forward clock at the latest step (at construction before any): blocks stamped
        # after it ran since; see _not_run_since_last_step.
        self._clock_at_step = forward_clock()
        self._stale: set[str] = set()
        self._last_trained: set[str] | None = None  # the blocks of the latest step

    # -- settings: a scalar or one entry per trained block ---------------------------------
    def get(self, name: str):
        return self._spec[name]

    def set(self, name: str, value) -> bool:
        """Check and set one setting (None: planned per block); whether its value changed. The
        caller binds again (rebind)."""
        previous = self._spec.get(name, ...)
        self._spec[name] = (
            None
            if value is None
            else check_per_block(name, value, integer=name == "iterations", planned_entries=True)
        )
        return self._spec[name] != previous

    def rebind(self):
        """Bind the settings again to the blocks they are bound to (after `set`)."""
        if self.bound is not None and len(self._spec) == len(HYPERPARAMETERS):
            self.bind(self.bound)

    @property
    def planning(self) -> bool:
        """Whether any setting is planned (None, or a None entry of a per-block list)."""
        return any(
            v is None or (isinstance(v, list) and None in v)
            for v in (self._spec[h] for h in HYPERPARAMETERS)
        )

    def bind_initial(self):
        """Bind the settings now if the trained blocks are known already (blocks=, or a
        training forward pass before the trainer was built)."""
        if self.chosen is not None:
            self.bind(self.chosen)
        elif any(b.input_needs_target is not None for _, b in self.model_blocks):
            self.bind(self.data_flow_blocks())

    def bind(self, blocks):
        """Assign every setting to `blocks` (forward order) by name."""
        per_block = []
        for name in HYPERPARAMETERS:
            value = self._spec[name]
            if isinstance(value, list):
                if len(value) != len(blocks):
                    raise ValueError(
                        f"FeedbackTrainer: {name} has {len(value)} entries, but {len(blocks)} DTP "
                        f"blocks are trained ({[n for n, _ in blocks]}, forward order; one entry "
                        f"per block){self._describe_skipped(blocks)}"
                    )
                per_block.append(value)
            else:  # a scalar, or None: planned per block
                per_block.append([value] * len(blocks))
        self.bound = list(blocks)
        self._settings = {
            n: BlockSettings(*values) for (n, _), values in zip(blocks, zip(*per_block))
        }

    def bound_names(self) -> list[str]:
        """The blocks the settings are bound to, forward order (empty before they are known)."""
        return [n for n, _ in self.bound or []]

    def bind_saved(self, saved: list[str]) -> dict:
        """Take a saved binding (a trainer that has not seen a forward pass), or check that it
        matches this one; {name: block} of the bound blocks."""
        by_name = dict(self.model_blocks)
        if self.bound is None and all(n in by_name for n in saved):
            if saved:
                self.bind([(n, by_name[n]) for n in saved])
        elif saved != self.bound_names():
            absent = [n for n in saved if n not in by_name]
            raise ValueError(
                f"FeedbackTrainer.load_state_dict: state is for blocks {saved}, this "
                + (
                    f"model has no DTP blocks named {absent} (its blocks: {list(by_name)}): "
                    "a state saved from another model"
                    if absent
                    else f"trainer trains {self.bound_names()} (forward order)"
                )
            )
        return dict(self.bound or [])

    def _describe_skipped(self, trained) -> str:
        """The model's blocks left out of `trained`, each with the reason (for count errors)."""
        names = {n for n, _ in trained}
        skipped = [
            f"{n}: {self.skip_reason(n, b) or 'not trained'}"
            for n, b in self.model_blocks
            if n not in names
        ]
        return "; not trained: " + "; ".join(skipped) if skipped else ""

    # -- which blocks ---------------------------------------------------------------------
    def data_flow_blocks(self):
        """The blocks whose input needed a target in the latest training forward pass, in
        forward execution order."""
        needed = [(n, b) for n, b in self.model_blocks if b.input_needs_target]
        return sorted(needed, key=lambda nb: nb[1].forward_stamp)

    def _not_run_since_last_step(self, blocks) -> set[str]:
        """The names among `blocks` that ran no training forward pass since the previous step()
        while others did (a branch not taken this time): their recorded input is an older
        batch's, so they are not trained this step. When none ran since (several steps on one
        forward pass), the previous step's blocks are trained again and only they."""
        names = {n for n, _ in blocks}
        ran = {
            n
            for n, b in blocks
            if b.forward_stamp is not None and b.forward_stamp > self._clock_at_step
        }
        if ran:
            return names - ran
        return names - self._last_trained if self._last_trained is not None else set()

    def skip_reason(self, name, block) -> str | None:
        """Why `block` is not trained at the next step (None: it is, as far as known)."""
        if name in self._stale:
            return (
                "it did not run in the latest training forward pass (a branch not taken): not "
                "trained on its older input"
            )
        if self.chosen is not None:
            return None if any(n == name for n, _ in self.chosen) else "not in blocks="
        if block.input_needs_target is None:
            return (
                "no training-mode forward pass with autograd on has run through it yet"
                if block.recorded_input is None or block.forward_stamp is None
                else "its training forward passes ran without autograd (torch.no_grad, or the "
                "first pass of reentrant activation checkpointing, whose replay in backward() "
                "tells: call step() after backward()), so the data flow is unknown"
            )
        if not block.input_needs_target:
            return (
                "its input did not require grad in the latest training forward pass (it comes "
                "from the data or frozen modules only): no target is needed"
            )
        return None

    def skipped(self, trained: list[TrainedBlock]) -> list[tuple[str, str | None]]:
        """(name, reason) for each of the model's blocks not in `trained`."""
        names = {t.name for t in trained}
        return [(n, self.skip_reason(n, b)) for n, b in self.model_blocks if n not in names]

    def trained_now(self) -> list[TrainedBlock]:
        """The blocks this step trains, forward order, with their settings (None: planned)."""
        if self.chosen is not None:
            blocks = self.chosen
        else:
            if all(b.input_needs_target is None for _, b in self.model_blocks):
                raise RuntimeError(
                    "FeedbackTrainer: no recorded forward pass with autograd on, so which blocks "
                    "need targets is unknown; run model(x) in training mode (model.train(), "
                    "outside torch.no_grad) before step(), or pass blocks="
                )
            blocks = self.data_flow_blocks()
            if self.bound is None:
                self.bind(blocks)
        self._stale = self._not_run_since_last_step(blocks)
        blocks = [(n, b) for n, b in blocks if n not in self._stale]
        unbound = [n for n, _ in blocks if n not in self._settings]
        if unbound:
            if any(isinstance(self._spec[h], list) for h in HYPERPARAMETERS):
                raise RuntimeError(
                    f"FeedbackTrainer.step: blocks {unbound} now need targets, but the per-block "
                    f"lists were bound to {self.bound_names()} when the trained blocks "
                    "were first known; pass scalars, blocks=, or a new trainer"
                )
            given = BlockSettings(*(self._spec[h] for h in HYPERPARAMETERS))
            self._settings.update({n: given for n in unbound})
        return [TrainedBlock(n, b, self._settings[n]) for n, b in blocks]

    def stepped(self, trained: list[TrainedBlock]):
        """A step trained `trained`: the next step compares forward passes with this one."""
        self._clock_at_step = forward_clock()
        self._last_trained = {t.name for t in trained}
