"""FeedbackTrainer: the L-DRL feedback phase (docs/maths.md §2, §4) for every trained block of a
model. docs/feedback_trainer.md is its guide; its collaborators are in dtp_ext/feedback/."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from . import alignment, ops
from .averaging import MAX_DRIFT, FeedbackAverages
from .cuda_graphs import LoopGraphs
from .feedback.block_loop import LoopOptions, check_block, train_block
from .feedback.guard import BlockRun, refuse_divergence, restore
from .feedback.history import BlockHistory
from .feedback.memory import chunk_iterations, feedback_bytes_per_iteration
from .feedback.plans import BlockPlans
from .feedback.ranks import process_group_size
from .feedback.report import FeedbackReport, measure_quality
from .feedback.selection import BlockSelection
from .feedback.settings import (
    HYPERPARAMETERS,
    MAX_ITERATIONS,
    SYNC_MODES,
    check_per_block,
    finite_real,
)
from .feedback.streams import BlockStreams
from .nn import DTPBlock, dtp_blocks, track_forward_passes

__all__ = [
    "FeedbackTrainer",
    "FeedbackReport",
    "MAX_ITERATIONS",
    "HYPERPARAMETERS",
    "SYNC_MODES",
    "check_per_block",
    "chunk_iterations",
    "feedback_bytes_per_iteration",
]


def _planning_setting(name: str, valid, expected: str) -> property:
    """A FeedbackTrainer setting that plans are made with: checked (`valid`, `expected` for the
    error) and, when it changes, the plans made again at the next step."""
    return property(
        lambda self: self._planning[name],
        lambda self, v: self._set_planning(name, v, valid, expected),
    )


# A cost cap: multiply-adds per step over a backprop step's, or None.
_COST_CAP = (
    lambda v: v is None or (finite_real(v) and v > 0),
    "None or a finite number > 0 (feedback multiply-adds per step over a backprop step's)",
)


class FeedbackTrainer:
    """Trains the feedback weights of a model's DTP blocks with L-DRL; docs/feedback_trainer.md
    is the guide (its sections are cited as §N below).

    - `blocks`: the blocks to train, in that order (default: those whose input needs a target,
      in forward order; §1). `explain()` says which are trained, how, and why others are not.
    - `iterations`, `noise_std`, `lr`: None (planned per block at the first step within
      `target_angle` and `max_cost`, or `feedback_only_max_cost` at a step whose forward
      weights did not move since the previous one), a scalar or one entry per trained block (§2); `momentum`,
      `weight_decay`: the feedback loop's SGD (docs/maths.md §4).
    - `average_decay`, `warm_start`: the feedback averages targets use and a block's extra
      iterations at its first step; "auto" (the default) turns both on when any setting is
      planned (§3).
    - `memory_budget_mb`, `max_growth`, `concurrent_blocks`: a step's memory, its divergence
      guard and its CUDA streams (§4); `sync`: the ranks under torch.distributed (§6);
      `compute_dtype`: mixed precision (§7); `cuda_graphs`: captured loops (§8).

    `step()` runs every trained block's feedback loop on its recorded input, all or nothing,
    and returns a FeedbackReport (§4); `state_dict()` / `load_state_dict()` resume it (§9).
    """

    def __init__(
        self,
        model: nn.Module,
        iterations=None,
        noise_std=None,
        lr=None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        blocks: Sequence | None = None,
        memory_budget_mb: float = 256.0,
        concurrent_blocks: bool = True,
        sync: str | None = None,
        max_growth: float | None = 100.0,
        compute_dtype: torch.dtype | None = None,
        cuda_graphs: bool = False,
        target_angle: float = alignment.DEFAULT_TARGET_ANGLE,
        average_decay: float | str | None = "auto",
        warm_start: bool | str = "auto",
        max_cost: float | None = alignment.DEFAULT_MAX_COST,
        feedback_only_max_cost: float | None = alignment.DEFAULT_FEEDBACK_ONLY_MAX_COST,
    ):
        named = dtp_blocks(model)
        if not named:
            raise ValueError(
                "FeedbackTrainer: the model has no dtp_ext.Linear/Conv2d blocks; "
                "build it from dtp_ext layers or call dtp_ext.convert(model) first"
            )
        self._model_blocks = named
        track_forward_passes(model)
        self._selection = BlockSelection(named, blocks)
        self._plans = BlockPlans()
        self.iterations = iterations
        self.noise_std = noise_std
        self.lr = lr
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(
                f"FeedbackTrainer: weight_decay must be finite and >= 0, got {weight_decay!r}"
            )
        if not (finite_real(memory_budget_mb) and memory_budget_mb > 0):
            raise ValueError(
                f"FeedbackTrainer: memory_budget_mb must be a finite number > 0, got "
                f"{memory_budget_mb!r}"
            )
        if max_growth is not None and not (finite_real(max_growth) and max_growth > 1):
            raise ValueError(
                f"FeedbackTrainer: max_growth must be None or a finite number > 1, got "
                f"{max_growth!r}"
            )
        self.max_growth = None if max_growth is None else float(max_growth)
        self._planning = {}  # the settings plans are made with (the properties below)
        self.momentum = momentum
        self.target_angle = target_angle
        self.max_cost = max_cost
        self.feedback_only_max_cost = feedback_only_max_cost
        planning = self._selection.planning
        if average_decay == "auto":
            average_decay = alignment.DEFAULT_AVERAGE_DECAY if planning else None
        if average_decay is not None and not (
            finite_real(average_decay) and 0 <= average_decay < 1
        ):
            raise ValueError(
                f"FeedbackTrainer: average_decay must be 'auto', None or a number in [0, 1), got "
                f"{average_decay!r}"
            )
        self._averages = None if average_decay is None else FeedbackAverages(average_decay)
        if warm_start == "auto":
            warm_start = planning
        if not isinstance(warm_start, bool):
            raise ValueError(
                f"FeedbackTrainer: warm_start must be 'auto', True or False, got {warm_start!r}"
            )
        self.warm_start = warm_start
        self._history = BlockHistory(named)
        if compute_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                f"FeedbackTrainer: compute_dtype must be None, torch.bfloat16 or "
                f"torch.float16, got {compute_dtype!r}"
            )
        # Mixed precision (§7): the loops' products run in compute_dtype (None: the recorded
        # input's dtype); the feedback weights and momentum stay float32 masters.
        self.compute_dtype = compute_dtype
        if not isinstance(cuda_graphs, bool):
            raise ValueError(
                f"FeedbackTrainer: cuda_graphs must be True or False, got {cuda_graphs!r}"
            )
        # CUDA blocks' loops captured once and replayed (§8, dtp_ext/cuda_graphs.py).
        self.cuda_graphs = cuda_graphs
        self._graphs = LoopGraphs()
        self._model = model
        self.weight_decay = float(weight_decay)
        self.memory_budget_mb = float(memory_budget_mb)
        if sync not in SYNC_MODES:
            raise ValueError(f"FeedbackTrainer: sync must be one of {SYNC_MODES}, got {sync!r}")
        self.sync = sync
        self.concurrent_blocks = bool(concurrent_blocks)
        self._streams = BlockStreams()
        self._momentum_buffers: dict[str, dict[str, torch.Tensor]] = {}
        # The lr each block's momentum buffers were last used at (docs/maths.md §8: a planned lr
        # that changes starts its buffers afresh).
        self._buffer_lr: dict[str, float] = {}
        # Each block's feedback quality after its latest step (FeedbackReport: is V growing?).
        self._last_quality: dict[str, torch.Tensor] = {}
        self.steps = 0
        self._selection.bind_initial()

    # -- settings: None (planned), a scalar or one entry per trained block (§2) -------------
    def _set_hyperparameter(self, name, value):
        if self._selection.set(name, value):
            self._plans.clear()  # planned again with the new value
        self._selection.rebind()

    iterations = property(
        lambda self: self._selection.get("iterations"),
        lambda self, v: self._set_hyperparameter("iterations", v),
    )
    noise_std = property(
        lambda self: self._selection.get("noise_std"),
        lambda self, v: self._set_hyperparameter("noise_std", v),
    )
    lr = property(
        lambda self: self._selection.get("lr"),
        lambda self, v: self._set_hyperparameter("lr", v),
    )

    # -- what plans are made with: set at any time, the plans are made again (§2) -----------
    def _set_planning(self, name, value, valid, expected):
        if not valid(value):
            raise ValueError(f"FeedbackTrainer: {name} must be {expected}, got {value!r}")
        value = None if value is None else float(value)
        if self._planning.get(name, value) != value:
            self._plans.clear()
        self._planning[name] = value

    momentum = _planning_setting("momentum", lambda v: finite_real(v) and 0 <= v < 1, "in [0, 1)")
    target_angle = _planning_setting(
        "target_angle", lambda v: finite_real(v) and 0 < v < 90, "a number of degrees in (0, 90)"
    )
    max_cost = _planning_setting("max_cost", *_COST_CAP)
    feedback_only_max_cost = _planning_setting("feedback_only_max_cost", *_COST_CAP)

    def _sync_mode(self, world: int) -> str:
        """How the ranks sync their feedback (docs/feedback_trainer.md §6): `sync`, or
        "gradients" by default, under a process group of more than one rank."""
        return (self.sync or "gradients") if world > 1 else "none"

    def _planned(self, trained: list, feedback_only: bool | None = None) -> list:
        """`trained` with its planned settings: a feedback-only step's (no trained block's
        forward weight moved since its latest step: a warm-up, whose cost cap is
        `feedback_only_max_cost`) or a training step's (`max_cost`); `feedback_only`: that
        kind's, whatever the next step's."""
        if feedback_only is None:
            feedback_only = self._history.forward_still(trained)
        world = process_group_size()
        return self._plans.apply(
            trained,
            self._model_blocks,
            feedback_only,
            # Under "weights" and "none" each rank's iterations run on its own batch: planned
            # for the global one, a block planned at half its stability limit is at it on 2
            # ranks (docs/feedback_trainer.md §6).
            ranks=world if self._sync_mode(world) == "gradients" else 1,
            momentum=self.momentum,
            target_angle=self.target_angle,
            averaged_steps=None if self._averages is None else alignment.PLAN_AVERAGED_STEPS,
            max_cost=self.feedback_only_max_cost if feedback_only else self.max_cost,
            warm_start=self.warm_start,
        )

    @property
    def plans(self) -> dict[str, alignment.BlockPlan]:
        """Each trained block's settings and predicted floor and cost (dtp_ext.alignment), by
        name; empty before the first step (or explain()) after a training forward pass."""
        return self._plans.as_dict()

    @property
    def blocks(self) -> list:
        """[(name, block)] trained at the next step, in forward order."""
        return [(t.name, t.block) for t in self._selection.trained_now()]

    def explain(self, feedback_only: bool | None = None) -> str:
        """Which blocks step() trains, in which order and with which hyperparameters, each
        block's predicted noise floor and cost (flagging blocks predicted unstable or above
        `target_angle`), and why the model's other DTP blocks are skipped. The plans shown are
        the next step's or, `feedback_only` True / False, those of a feedback-only (warm-up) /
        training step (e.g. a warm-up's before the first step, a training step)."""
        if feedback_only is not None and not isinstance(feedback_only, bool):
            raise ValueError(
                f"FeedbackTrainer.explain: feedback_only must be None, True or False, got "
                f"{feedback_only!r}"
            )
        try:
            trained = self._selection.trained_now()
        except RuntimeError as exc:
            return f"FeedbackTrainer: nothing to train yet: {exc}"
        if process_group_size() == 1:  # planning may all-reduce: step() alone does it there
            trained = self._planned(trained, feedback_only)
        how = (
            "as chosen by blocks="
            if self._selection.chosen is not None
            else "their inputs need targets (data flow of the latest training forward pass), forward order"
        )
        lines = [
            f"FeedbackTrainer: {len(trained)} of {len(self._model_blocks)} DTP blocks trained, "
            f"{how}:"
        ]
        averaging = (
            "targets use each feedback weight's mean over the steps its forward weight stays "
            f"put (floors: after {alignment.PLAN_AVERAGED_STEPS} such steps); once it moves, "
            + (
                "the feedback weight itself"
                if self._averages.decay == 0
                else f"a window of at most {1 / (1 - self._averages.decay):.3g} steps that "
                "follows its drift (the feedback weight itself after a step that moved it more "
                f"than {MAX_DRIFT:.0%})"
            )
            if self._averages is not None
            else "targets use the trained feedback weights themselves (no averaging)"
        )
        lines.append(
            f"  target floor {self.target_angle:g}° per block, cost cap "
            f"{'none' if self.max_cost is None else f'{self.max_cost:g}x a backprop step (multiply-adds)'}"
            f" at a training step, {'none' if self.feedback_only_max_cost is None else f'{self.feedback_only_max_cost:g}x'}"
            " at a feedback-only step (no forward weight moved since the previous step); "
            f"{averaging}"
        )
        kinds = {True: "feedback-only", False: "training"}
        shown = self._plans.current
        following = self._history.forward_still(trained)
        lines.append(
            f"  plans for the next step, a {kinds[shown]} step:"
            if shown == following
            else f"  plans for a {kinds[shown]} step (the next step is a {kinds[following]} one):"
        )
        held = (
            {}
            if self._averages is None
            else {t.name: self._averages.steps(t.name) for t in trained}
        )
        # The warm starts run with the next step's plans: counted where those are shown.
        warm_due = {
            t.name
            for t in trained
            if shown == following
            and self._plans.get(t.name) is not None
            and self._history.warm_start_pending(t.name, self.warm_start, self._plans)
        }
        lines += self._plans.describe(trained, held, warm_due)
        skipped = self._selection.skipped(trained)
        if skipped:
            lines.append("skipped:")
            lines += [f"  {n}: {why}" for n, why in skipped]
        return "\n".join(lines)

    def _buffers(self, name: str, block: DTPBlock) -> dict[str, torch.Tensor]:
        """The block's momentum buffers (made, or moved to its feedback weight's device and
        dtype, on demand)."""
        buffers = self._momentum_buffers.get(name)
        fw = block.feedback_weight
        if buffers is None:
            buffers = {
                "weight": torch.zeros_like(fw),
                "bias": torch.zeros_like(block.feedback_bias),
            }
        elif buffers["weight"].device != fw.device or buffers["weight"].dtype != fw.dtype:
            buffers = {k: v.to(device=fw.device, dtype=fw.dtype) for k, v in buffers.items()}
        self._momentum_buffers[name] = buffers
        return buffers

    def _restarts_momentum(self, name: str, lr: float) -> bool:
        """Whether a block's momentum buffers start afresh at this step: its planned lr differs
        from the one they were last used at (a plan for the other kind of step, or for a new
        input shape). The buffers hold the gradients of the old plan's noise, which the new lr
        would turn into a kick of V away from its floor: ~22x the old displacement where a
        feedback-only step's copies raise the lr 22-fold (docs/maths.md §8). A given lr
        (explicit, or set by the user between steps) keeps them, as torch.optim does."""
        last = self._buffer_lr.get(name)
        plan = self._plans.get(name)
        return last is not None and last != lr and plan is not None and "lr" in plan.planned

    def chunk_iterations(self, block: DTPBlock, x: torch.Tensor) -> int:
        """How many iterations share one batched F(x + eps) under the memory budget."""
        return chunk_iterations(block, x, self.memory_budget_mb)

    @torch.no_grad()
    def step(self, *, noise: dict[str, tuple] | None = None) -> FeedbackReport:
        """Run the feedback iterations of every trained block; returns the per-iteration losses.

        A step is all or nothing: if any block diverges (a non-finite value, or feedback weights
        that grow more than `max_growth` times), is refused by a kernel, or the step is
        interrupted (Ctrl-C), every block's feedback weights and momentum are restored to their
        values before the step and the error is raised.

        `noise` (research and tests) maps a block name to explicit (noise_x, noise_y) tensors of
        shapes [K, *x.shape] and [K, *output.shape], already scaled.
        """
        report = FeedbackReport()
        runs: list[BlockRun] = []
        world = process_group_size()
        sync = self._sync_mode(world)
        options = LoopOptions(
            self.momentum,
            self.weight_decay,
            self.compute_dtype,
            self.cuda_graphs,
            sync,
            world,
            self.chunk_iterations,
        )
        trained = self._selection.trained_now()
        parameters = {p.untyped_storage().data_ptr(): n for n, p in self._model.named_parameters()}
        for t in trained:
            check_block(t.name, t.block, parameters)
        trained = self._planned(trained)
        self._history.warn_untrained_feedback(trained)
        try:
            for t in trained:
                name, block, (k, sigma, lr) = t.name, t.block, t.settings.values()
                x = block.recorded_input
                buffers = self._buffers(name, block)
                noise_x, noise_y = (noise or {}).get(name, (None, None))
                copies = t.settings.copies
                if copies > 1 and noise_x is not None:
                    raise ValueError(
                        f"FeedbackTrainer.step: block {name!r}'s plan runs each iteration on "
                        f"{copies} noise copies of its batch, but noise= gives noise for the batch "
                        "itself; give iterations= and lr= (a given setting is never copied)"
                    )
                warm = self._history.warm_start_pending(name, self.warm_start, self._plans)
                if warm and noise_x is not None:
                    raise ValueError(
                        f"FeedbackTrainer.step: block {name!r} is due its warm start "
                        f"({warm} extra iterations) but noise= gives only its {k} iterations' "
                        "noise; pass warm_start=False to the trainer to give all noise yourself"
                    )
                run = BlockRun.start(name, block, buffers)
                runs.append(run)
                if self._restarts_momentum(name, lr):
                    for b in buffers.values():
                        b.zero_()  # in place: captured CUDA graphs hold the addresses
                # Blocks share no state during the feedback phase: on a GPU each runs on its
                # own stream, so small blocks fill the device while large ones run.
                try:
                    with self._streams.use(
                        x.device, len(runs) - 1, sync == "none" and self.concurrent_blocks
                    ):
                        warm_losses = (
                            train_block(
                                name,
                                block,
                                x,
                                run.state(),
                                warm,
                                sigma,
                                self._plans[name].warm_start_lr,
                                None,
                                None,
                                options,
                                self._graphs,
                            )[0]
                            if warm
                            else None
                        )
                        run.losses, kernel = train_block(
                            name,
                            block,
                            x if copies == 1 else torch.cat([x] * copies),  # keeps its layout
                            run.state(),
                            k,
                            sigma,
                            lr,
                            noise_x,
                            noise_y,
                            options,
                            self._graphs,
                        )
                        if warm_losses is not None:
                            run.losses = torch.cat([warm_losses, run.losses])
                except ops.NonFiniteInputError as exc:  # refused before the op touched V
                    raise FloatingPointError(
                        f"FeedbackTrainer.step: block {name!r} was not trained: {exc} (its recorded "
                        "input is not finite when the forward pass diverged); every block's feedback "
                        "weights and momentum were restored to their values before this step"
                    ) from exc
                report.losses[name] = run.losses
                report.kernels[name] = kernel
            self._streams.join([r.losses for r in runs])
            report._final_losses = refuse_divergence(runs, self.max_growth)
        except BaseException:
            self._streams.join([r.losses for r in runs])
            restore(runs)
            raise
        self.steps += 1
        self._selection.stepped(trained)
        for t in trained:
            self._buffer_lr[t.name] = t.settings.lr
            plan = self._plans[t.name]
            self._history.record_step(t.name, t.block, plan, self._averages, self.warm_start)
            report._quality[t.name] = measure_quality(t.block, plan.shape.tap_use)
            if t.name in self._last_quality:
                report._previous[t.name] = self._last_quality[t.name]
            self._last_quality[t.name] = report._quality[t.name]
            report._plans[t.name] = plan
        return report

    def state_dict(self) -> dict:
        """Momentum buffers, step count, the blocks the per-block lists are bound to (forward
        order; empty before the trained blocks are known), each block's steps, the input shape
        its plan was made for, and the feedback averages: a resumed trainer continues
        bitwise (§9)."""
        history = self._history.state_dict()
        return {
            "steps": self.steps,
            "momentum_buffers": {
                n: {k: v.clone() for k, v in b.items()} for n, b in self._momentum_buffers.items()
            },
            "blocks": self._selection.bound_names(),
            "block_steps": history["block_steps"],
            "planned_for": self._plans.state_dict(),
            "averages": None if self._averages is None else self._averages.state_dict(),
            "buffer_lr": dict(self._buffer_lr),
            # Whether each block's forward weight moved since its latest step (the next step
            # treats its average accordingly; docs/maths.md §7.3).
            "forward_moved": history["forward_moved"],
            # ...and a checksum of its forward weight then: the next step sees whether it moved
            # since, whichever of the model and the trainer is loaded first.
            "forward_digest": history["forward_digest"],
        }

    def load_state_dict(self, state: dict):
        if not isinstance(state, dict) or "momentum_buffers" not in state:
            raise ValueError(
                "FeedbackTrainer.load_state_dict: expected a dict from FeedbackTrainer.state_dict()"
            )
        # A trainer that has not seen a forward pass takes the saved binding.
        blocks = self._selection.bind_saved(list(state.get("blocks") or []))
        for name, buffers in state["momentum_buffers"].items():
            block = blocks[name]
            if buffers["weight"].shape != block.feedback_weight.shape:
                raise ValueError(
                    f"FeedbackTrainer.load_state_dict: momentum buffer of {name!r} has shape "
                    f"{tuple(buffers['weight'].shape)}, expected {tuple(block.feedback_weight.shape)}: "
                    f"this model's block {name!r} is not the layer the state was saved from "
                    "(load it into the model it was saved with)"
                )
        # Every buffer checked before any is written: into the existing buffers where they match
        # (as nn.Module.load_state_dict does), so captured CUDA graphs, which hold their
        # addresses, stay valid.
        loaded = {}
        for name, buffers in state["momentum_buffers"].items():
            block = blocks[name]
            current = self._momentum_buffers.get(name, {})
            loaded[name] = {}
            for k, v in buffers.items():
                old = current.get(k)
                if old is not None and old.shape == v.shape:
                    loaded[name][k] = old.copy_(v)
                else:
                    loaded[name][k] = v.to(
                        device=block.feedback_weight.device, dtype=block.feedback_weight.dtype
                    ).clone()
        averages = state.get("averages")
        if (averages is None) != (self._averages is None) or (
            averages is not None and averages.get("decay") != self._averages.decay
        ):
            raise ValueError(
                "FeedbackTrainer.load_state_dict: the state was saved by a trainer with "
                f"average_decay={None if averages is None else averages.get('decay')}, this one "
                f"has {None if self._averages is None else self._averages.decay}; build the "
                "trainer with the same settings to resume it"
            )
        if averages is not None:
            self._averages.load_state_dict(averages, blocks)
        self._momentum_buffers = loaded
        buffer_lr = state.get("buffer_lr") or {}  # absent from older states: nothing restarts
        self._buffer_lr = {n: float(v) for n, v in buffer_lr.items() if n in loaded}
        self.steps = int(state.get("steps", 0))
        self._history.load_state_dict(
            state.get("block_steps") or {},
            state.get("forward_moved") or {},
            state.get("forward_digest"),
        )
        # Plans are made again, for the saved input shapes, at the next step.
        self._plans.load_state_dict(state.get("planned_for") or {})
