"""Each trained block's plan (dtp_ext.alignment.plan_feedback: settings, predicted floor and
cost), kept per block and made again when a block's per-sample input shape changes
(docs/feedback_trainer.md §2, docs/maths.md §8)."""

from __future__ import annotations

import dataclasses
import math

import torch

from .. import alignment
from ..user_warnings import warn_at_caller
from .ranks import sum_across_ranks
from .selection import TrainedBlock
from .settings import HYPERPARAMETERS, BlockSettings


class BlockPlans:
    """The plans by block name, for training steps and for feedback-only steps (each made
    under its own cost cap, when first needed), the input shape each was made for, and every
    block's forward multiply-adds at the plans' batch (what explain() compares their cost
    with)."""

    def __init__(self):
        # {feedback_only: {name: plan}}; `current`: the kind the latest apply() used.
        self._by_kind: dict[bool, dict[str, alignment.BlockPlan]] = {False: {}, True: {}}
        self.current = False
        self._planned_for: dict[str, tuple] = {}  # name -> (per-sample shape, batch)
        self.forward_macs = 0  # every block's forward multiply-adds, at the plans' batch
        self._warned: set[str] = set()  # blocks warned about as predicted unstable
        self._warned_small: set[str] = set()  # ...as unstable at a smaller batch than planned
        self._small_streak: dict[str, int] = {}  # steps in a row at such batches, by block
        # {kind: (target_angle, averaged_steps)} its plans were made with (explain() says what
        # the blocks a cost cap holds above target would need).
        self._made_with: dict[bool, tuple[float, int | None]] = {}

    @property
    def _plans(self) -> dict[str, alignment.BlockPlan]:
        return self._by_kind[self.current]

    def __getitem__(self, name: str) -> alignment.BlockPlan:
        return self._plans[name]

    def get(self, name: str) -> alignment.BlockPlan | None:
        return self._plans.get(name)

    def as_dict(self) -> dict[str, alignment.BlockPlan]:
        return dict(self._plans)

    def clear(self):
        """Plan every block again at the next step (a setting changed)."""
        self._by_kind = {False: {}, True: {}}
        self._made_with = {}

    def apply(
        self,
        trained: list[TrainedBlock],
        model_blocks: list,
        feedback_only: bool,
        ranks: int = 1,
        **options,
    ) -> list[TrainedBlock]:
        """`trained` with each block's settings taken from its plan for a training step or,
        `feedback_only`, for a step whose forward weights stay put (made with that kind's
        `max_cost` in `options`), made for the blocks' recorded inputs when missing or when a
        block's per-sample input shape changed; the batch a block was first planned for is
        kept. `ranks`: the processes whose batches each feedback iteration's gradient averages
        over (under torch.distributed: every rank when the ranks sync their feedback gradients,
        1 when each iterates on its own batch): plans are made for their summed batch. `options`: plan_feedback's momentum,
        target_angle, averaged_steps, max_cost and warm_start."""
        self.current = bool(feedback_only)
        keys = {}
        for t in trained:
            x = t.block.recorded_input
            if x is None:
                return trained  # nothing to plan from yet (step() refuses it)
            old = self._planned_for.get(t.name)
            per_sample = tuple(x.shape[1:])
            keys[t.name] = (per_sample, old[1] if old and old[0] == per_sample else None)
        if any(k[1] is None for k in keys.values()) or any(n not in self._plans for n in keys):
            self._make(trained, keys, model_blocks, ranks, options)
        self._warn_small_batches(trained, ranks)
        return [
            dataclasses.replace(t, settings=self._settings(self._plans[t.name])) for t in trained
        ]

    def _warn_small_batches(self, trained, ranks):
        """Warn once per block when batches so much smaller than the one its plan was made for
        (and kept: docs/feedback_trainer.md §2) that its settings are unstable there (the
        floor's load c * fan_out / (B P) grows as the batch shrinks) come two steps in a row:
        V grows only while they last, so an epoch's last, partial batch is no concern."""
        for t in trained:
            plan = self._plans[t.name]
            batch = (
                t.block.recorded_input.shape[0] * ranks
            )  # as the plans' batch: summed over ranks
            load = plan.raw_floor.load * plan.shape.batch / batch
            streak = self._small_streak[t.name] = (
                self._small_streak.get(t.name, 0) + 1 if load >= 1 else 0
            )
            if streak >= 2 and t.name not in self._warned_small:
                self._warned_small.add(t.name)
                warn_at_caller(
                    f"FeedbackTrainer: block {t.name!r}'s feedback settings were planned for a "
                    f"batch of {plan.shape.batch} and are unstable at the latest steps' {batch} "
                    f"(c * fan_out / (B P) = {load:.2g} >= 1): its feedback weight grows while "
                    "such batches last; drop or merge small batches (DataLoader(drop_last=True)), or "
                    "give the trainer a lower lr (docs/maths.md §7.4)",
                )

    @staticmethod
    def _settings(plan: alignment.BlockPlan) -> BlockSettings:
        return BlockSettings(plan.iterations, plan.noise_std, plan.lr, plan.copies)

    def _make(self, trained, keys, model_blocks, ranks, options):
        # A new input shape is planned for its batch: under torch.distributed, where the ranks
        # sync their feedback gradients, the global one (every rank's shard: the noise samples
        # an averaged gradient holds), so that every rank plans the same iterations (one
        # all-reduce, when a shape is first seen); where each rank iterates on its own batch,
        # that batch (its stability limit is the rank's).
        new = [t.name for t in trained if keys[t.name][1] is None]
        if new:
            # The other kind's plans were made for the old shapes: made again when needed.
            self._by_kind[not self.current] = {}
            recorded = {t.name: t.block.recorded_input for t in trained}
            batches = torch.tensor([recorded[n].shape[0] for n in new], dtype=torch.int64)
            if ranks > 1:
                batches = sum_across_ranks(batches.to(recorded[new[0]].device))
            keys = dict(keys)
            keys.update({n: (keys[n][0], int(b)) for n, b in zip(new, batches.tolist())})

        def shape_of(block, batch):
            """The block's shape on its recorded input, for `batch` samples."""
            x = block.recorded_input
            shape = alignment.block_shape(block, x)
            return dataclasses.replace(shape, batch=batch, macs=shape.macs * batch // x.shape[0])

        shapes = [(t.name, shape_of(t.block, keys[t.name][1])) for t in trained]
        # Every block call of the forward pass (a backprop step is 3 of them), at the plans'
        # batch (summed over the ranks where they sync: the planned over the recorded batch of
        # the first trained block); kept for explain(), which compares the plans' cost with it.
        # Counted per call: a block called several times costs that many forwards, whatever the
        # shapes of its calls.
        first = trained[0].block.recorded_input
        scale = shapes[0][1].batch / first.shape[0]
        self.forward_macs = scale * sum(
            alignment.block_shape(b, x).macs for _, b in model_blocks for x in b.recorded_calls()
        )
        given = {
            h: [t.settings.values()[i] for t in trained] for i, h in enumerate(HYPERPARAMETERS)
        }
        plans = alignment.plan_feedback(
            shapes,
            **given,
            **options,
            backprop_macs=self.forward_macs,
            allow_copies=self.current,  # a feedback-only step's W stays put (docs/maths.md §8)
        )
        self._made_with[self.current] = (
            options.get("target_angle", alignment.DEFAULT_TARGET_ANGLE),
            options.get("averaged_steps", alignment.PLAN_AVERAGED_STEPS),
        )
        for plan in plans:
            self._plans[plan.name] = plan
            self._planned_for[plan.name] = keys[plan.name]
            if not plan.raw_floor.stable and plan.name not in self._warned:
                self._warned.add(plan.name)
                warn_at_caller(
                    f"FeedbackTrainer: block {plan.name!r}'s feedback settings are predicted "
                    f"{plan.notes[0]}; its feedback weight would grow step after step "
                    "(dtp_ext.alignment.noise_floor, docs/maths.md §7)",
                )

    def describe(
        self, trained: list[TrainedBlock], held: dict | None = None, warm_due: set | None = None
    ) -> list[str]:
        """explain()'s lines for `trained` (numbered): each block's settings and, once planned,
        its plan, then the plans' predicted cost against a backprop step's (and its blocks' warm
        starts still due, `warm_due`: their names) and what the blocks above target need
        (`held`: the steps each block's feedback average holds)."""
        warm_due = set() if warm_due is None else warm_due
        lines, total = [], 0.0
        for i, t in enumerate(trained, 1):
            kind = type(t.block).__name__
            plan = self._plans.get(t.name)
            if plan is None:
                given = ", ".join(
                    f"{h} {'planned at the first step' if v is None else f'{v:g}'}"
                    for h, v in zip(HYPERPARAMETERS, t.settings.values())
                )
                lines.append(f"  {i}. {t.name} ({kind}): {given}")
                continue
            total += plan.cost
            k, sigma, lr = t.settings.values()
            flag = "  <-- " + "; ".join(plan.notes) if plan.notes else ""
            lines.append(
                f"  {i}. {t.name} ({kind}): iterations {k}, noise_std {sigma:g}, lr {lr:g}{flag}"
            )
            lines.append("       " + alignment.describe_plan(plan, t.name in warm_due))
        if self._plans and trained:
            backprop = 3 * self.forward_macs
            line = (
                f"  predicted feedback cost: {total / 1e9:.3g} G mult-adds per step, "
                f"{total / backprop if backprop else 0:.2f}x a backprop step's"
            )
            warm = sum(self._plans[n].warm_start_cost for n in warm_due if n in self._plans)
            if warm:
                line += (
                    f"; the warm starts due add {warm / 1e9:.3g} G to this step, "
                    f"{warm / backprop if backprop else 0:.3g}x a backprop step's (once)"
                )
            lines.append(line)
            lines += self._describe_above_target(trained, backprop, held or {})
        return lines

    def _describe_above_target(self, trained, backprop, held) -> list[str]:
        """What the blocks above target would need: where a cost cap holds some there, the cap
        under which every block runs the iterations its target needs (the plans' uncapped
        cost: the measure the cap is applied to) and the blocks even those leave above it; at
        a feedback-only step with averaging, the steps after which the averages of all blocks
        above target meet it at these plans (`held`: the steps each average holds already; at
        a training step W moves and the average's window is capped)."""
        plans = [self._plans.get(t.name) for t in trained]
        if None in plans or self.current not in self._made_with:
            return []
        target, averaged_steps = self._made_with[self.current]
        above = [p for p in plans if p.floor.stable and p.floor.angle > target]
        capped = [p for p in above if p.capped]
        lines = []
        if capped:
            # Rounded up: the cap printed lifts it.
            need = math.ceil(sum(p.uncapped_cost for p in plans) / max(backprop, 1) * 100) / 100
            cap = "feedback_only_max_cost" if self.current else "max_cost"
            line = (
                f"  {len(capped)} block(s) above target for the cost cap: {cap}={need:.2f} (x a "
                "backprop step) "
            )
            short = [p.name for p in capped if not p.uncapped_meets_target]
            most = f"{alignment.MAX_PLANNED_ITERATIONS} iterations a step"
            if len(short) == len(capped):
                line += f"gives them the most planned, {most}, still above target"
            else:
                line += "lifts it"
                if self.current and averaged_steps is not None:
                    line += f" (its plans meet the target after {averaged_steps} steps)"
                if short:
                    line += f", though {_names(short)} would stay above target at {most}"
            lines.append(line)
        # Blocks given no iterations never move: no number of steps brings them there.
        steps = {p.name: p.steps_to(target) for p in above if p.iterations}
        if steps and self.current and averaged_steps is not None:
            total = max(steps.values())
            left = max(n - held.get(name, 0) for name, n in steps.items())
            lines.append(
                f"  at these plans the averages of the {len(steps)} block(s) above target meet "
                f"it after ~{total} feedback-only steps in all, ~{max(0, math.ceil(left))} from "
                "here (docs/maths.md §7.3)"
            )
        return lines

    def state_dict(self) -> dict:
        """The input shape each block was planned for: {name: [per-sample shape, batch]}."""
        return {n: [list(k[0]), k[1]] for n, k in self._planned_for.items()}

    def load_state_dict(self, planned_for: dict):
        """Plan again, at the next step, for the saved input shapes and batches."""
        self._planned_for = {
            n: (tuple(shape), int(batch)) for n, (shape, batch) in planned_for.items()
        }
        self.clear()


def _names(names: list[str], shown: int = 3) -> str:
    """'a', 'a, b and c' or 'a, b, c and 4 more'."""
    quoted = [repr(n) for n in names]
    if len(quoted) == 1:
        return quoted[0]
    if len(quoted) <= shown:
        return ", ".join(quoted[:-1]) + " and " + quoted[-1]
    return ", ".join(quoted[:shown]) + f" and {len(quoted) - shown} more"
