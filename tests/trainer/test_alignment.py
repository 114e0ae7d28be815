"""The feedback noise floor (dtp_ext.alignment) against single blocks, the per-block plan that
FeedbackTrainer makes from it, averaged feedback weights for the targets, and the feedback
quality a step reports."""

import copy
import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtp_ext
from dtp_ext import alignment, averaging, reference
from dtp_ext.alignment import block_shape, curvature, noise_floor
from dtp_ext.metrics import feedback_in_forward_shape, tap_weighted


def measured_tan2(block, x, iterations, noise_std, lr, steps, settle, momentum=0.9, tap_use=(1.0,)):
    """Mean over steps settle..steps of tan^2 of the feedback weight's angle to W^T, kernel
    taps weighed by `tap_use`."""
    trainer = dtp_ext.FeedbackTrainer(
        nn.Sequential(block), iterations, noise_std, lr, momentum, blocks=[block]
    )
    block.train()
    block(x)
    values = []
    for step in range(steps):
        trainer.step()
        if step >= settle:
            w = tap_weighted(block.weight.detach().double(), tap_use).flatten()
            v = feedback_in_forward_shape(block, block.feedback_weight).double()
            v = tap_weighted(v, tap_use).flatten()
            cos = float(w @ v / (w.norm() * v.norm()))
            values.append((1 - cos * cos) / (cos * cos))
    return sum(values) / len(values)


@pytest.mark.parametrize(
    "make, x_shape",
    [
        (lambda: dtp_ext.Linear(48, 12), (32, 48)),
        (lambda: dtp_ext.Conv2d(24, 40, 1), (8, 24, 4, 4)),
    ],
    ids=["linear", "conv1x1"],
)
def test_floor_formula_predicts_a_single_blocks_stationary_angle(make, x_shape):
    """A block with a linear feedback path settles where noise_floor says: tan^2 of the angle
    between V and W^T averaged over 150 steps after a 30-step transient, within 20 % (the
    average of 150 correlated steps has ~10 % spread)."""
    torch.manual_seed(0)
    block = make()
    x = torch.randn(x_shape)
    shape = block_shape(block, x)
    sigma, rate, k = 0.1, 0.02, 5
    lr = rate / curvature(sigma, shape.positions)
    predicted = noise_floor(shape.fan_in, shape.fan_out, shape.samples, rate, 0.9)
    assert predicted.stable and 10 < predicted.angle < 40
    measured = measured_tan2(block, x, k, sigma, lr, 180, 30)
    tan2 = math.tan(math.radians(predicted.angle)) ** 2
    assert measured == pytest.approx(tan2, rel=0.2)


@pytest.mark.parametrize(
    "channels, size, stride, batch",
    [(32, 1, 1, 32), (32, 3, 1, 16), (64, 4, 2, 16), (32, 2, 2, 32)],
    ids=["1x1-map", "3x3-map", "stride2-4x4", "stride2-2x2"],
)
def test_floor_formula_on_maps_smaller_than_the_kernel_reach(channels, size, stride, batch):
    """A 3x3 conv on a map where its border taps read padding: the tap-geometry fans and
    per-tap use (BlockShape) predict the stationary angle of the feedback the map sees (taps
    weighed by use) within 20 % in tan^2; the full-kernel fans (C k^2) were 1.4-6x off (one of
    the taps on a 1x1 map is ever used; a stride-2 kernel feeds ~k^2/4 outputs per input)."""
    torch.manual_seed(0)
    block = dtp_ext.Conv2d(32, channels, 3, padding=1, stride=stride)
    x = torch.randn(batch, 32, size, size)
    shape = block_shape(block, x)
    rate = 0.02
    predicted = noise_floor(
        shape.fan_in, shape.fan_out, shape.samples, rate, 0.9, tap_use=shape.tap_use
    )
    lr = rate / curvature(0.1, shape.positions)
    measured = measured_tan2(block, x, 5, 0.1, lr, 150, 30, tap_use=shape.tap_use)
    tan2 = math.tan(math.radians(predicted.angle)) ** 2
    assert measured == pytest.approx(tan2, rel=0.2)
    full = noise_floor(32 * 9, channels * 9, shape.samples, rate, 0.9)
    assert math.tan(math.radians(full.angle)) ** 2 > 1.4 * tan2


def test_tap_geometry_of_a_block_shape():
    """Counted by hand: a 3x3 kernel with padding 1 on a 1x1 map reads inside only with its
    centre tap; on 2x2 every output reads 4 taps and the corners are used at 1 of 4 positions;
    at stride 2 an input feeds 1 or 2 outputs per dimension instead of 3."""
    conv = dtp_ext.Conv2d(8, 16, 3, padding=1)
    one = block_shape(conv, torch.empty(2, 8, 1, 1))
    assert (one.fan_in, one.fan_out) == (8, 16)
    assert one.tap_use == (0, 0, 0, 0, 1, 0, 0, 0, 0)
    two = block_shape(conv, torch.empty(2, 8, 2, 2))
    assert (two.fan_in, two.fan_out) == (8 * 4, 16 * 4)
    assert two.tap_use == pytest.approx((0.25, 0.5, 0.25, 0.5, 1, 0.5, 0.25, 0.5, 0.25))
    strided = dtp_ext.Conv2d(8, 16, 3, padding=1, stride=2)
    s = block_shape(strided, torch.empty(2, 8, 4, 4))
    # Per dimension: outputs 0, 1 read inputs (-1, 0, 1) and (1, 2, 3): taps inside 2 and 3
    # (mean over pairs (4 + 9) / 5); input 1 is read twice, 0, 2, 3 once: (1 + 4 + 1 + 1) / 5.
    assert s.fan_in == pytest.approx(8 * (13 / 5) ** 2)
    assert s.fan_out == pytest.approx(16 * (7 / 5) ** 2)
    big = block_shape(conv, torch.empty(2, 8, 64, 64))
    # A corner tap misses one row and one column of outputs.
    assert min(big.tap_use) == pytest.approx((63 / 64) ** 2)
    assert 8 * 9 * 0.95 < big.fan_in < 8 * 9


def test_floor_formula_predicts_instability():
    """c * fan_out >= B * P: the feedback weight's norm grows step after step, as predicted."""
    torch.manual_seed(0)
    block = dtp_ext.Linear(16, 256)
    x = torch.randn(8, 16)
    shape = block_shape(block, x)
    rate = 0.05
    floor = noise_floor(shape.fan_in, shape.fan_out, shape.samples, rate, 0.9)
    assert not floor.stable and floor.load > 1 and floor.angle == 90.0
    lr = rate / curvature(0.1, 1)
    trainer = dtp_ext.FeedbackTrainer(
        nn.Sequential(block), 5, 0.1, lr, max_growth=None, blocks=[block]
    )
    block(x)
    norms = []
    with pytest.warns(RuntimeWarning, match="predicted unstable.*fan_out 256.*B\\*P 8"):
        for _ in range(30):
            trainer.step()
            norms.append(float(block.feedback_weight.norm() / block.weight.detach().norm()))
    assert norms[-1] > 10 * norms[9]


def one_linear_block(*settings, dtype=torch.float32, **options):
    """A Linear(48, 12) trained alone as block "0" of an nn.Sequential, after one training
    forward pass on 32 random samples: (block, its input, its FeedbackTrainer)."""
    torch.manual_seed(0)
    block = dtp_ext.Linear(48, 12).to(dtype)
    x = torch.randn(32, 48, dtype=dtype)
    trainer = dtp_ext.FeedbackTrainer(nn.Sequential(block), *settings, blocks=[block], **options)
    block(x)
    return block, x, trainer


def test_floor_with_averaging_is_lower_and_measured_so():
    """The average of V over steps sits far closer to W^T than V itself, by the predicted
    averaging gain (within 50 %: one average of correlated steps, docs/maths.md §7.3)."""
    block, _, trainer = one_linear_block(5, 0.1, 1.0, average_decay=0.97)
    for _ in range(200):
        trainer.step()
    plan = trainer.plans["0"]
    s = plan.shape
    raw = noise_floor(s.fan_in, s.fan_out, s.samples, plan.rate, 0.9)
    # A fixed W: the plain mean of every step's V after the burn-in.
    averaged = trainer._averages.steps("0")
    assert averaged == 200 - plan.transient_steps
    avg = noise_floor(
        s.fan_in,
        s.fan_out,
        s.samples,
        plan.rate,
        0.9,
        iterations=5,
        average_decay=1.0,
        averaged_steps=averaged + 1,
    )
    assert avg.angle < raw.angle / 4
    quality = trainer.step().alignment()
    row = next(iter(quality.values()))
    t = math.tan(math.radians(row["angle"])) ** 2
    assert t == pytest.approx(math.tan(math.radians(avg.angle)) ** 2, rel=0.5)
    assert row["angle"] < row["raw_angle"] / 2


def small_net():
    return dtp_ext.convert(
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 8, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 16),
            nn.ReLU(),
            nn.Linear(16, 10),
        )
    )


def test_trainer_with_no_settings_plans_every_block_within_target_and_cap():
    torch.manual_seed(0)
    model = small_net()
    trainer = dtp_ext.FeedbackTrainer(model)
    model(torch.randn(32, 1, 8, 8))
    plans = trainer.plans
    assert plans == {}  # planned at the first step (or explain()): it needs the batch
    text = trainer.explain()
    plans = trainer.plans
    assert list(plans) == ["2", "5", "7"]
    for name, plan in plans.items():
        assert plan.planned == ("iterations", "noise_std", "lr")
        assert plan.floor.stable and plan.raw_floor.stable
        assert plan.floor.angle <= 4.0 or plan.notes, name
        assert f"{name} (" in text and f"lr {plan.lr:g}" in text
    assert "target floor 4° per block" in text and "predicted feedback cost" in text
    backprop = 3 * sum(block_shape(b, b.recorded_input).macs for _, b in dtp_ext.dtp_blocks(model))
    assert sum(p.cost for p in plans.values()) <= trainer.max_cost * backprop * (1 + 1e-9)


def test_a_block_above_target_is_flagged_with_its_floor():
    """The flag says by how much: a floor of 4.03 degrees printed as 4.0 read as a false flag."""
    shape = alignment.BlockShape(512, 512, 32, 1, True, 512 * 512 * 32)
    (plan,) = alignment.plan_feedback([("b", shape)], max_cost=1.0, backprop_macs=shape.macs)
    (note,) = plan.notes
    assert plan.floor.angle > 4
    assert note == f"above target (cost cap: {plan.floor.angle:.2f}° > 4°)"


def test_a_block_above_target_for_its_noise_copies_says_so():
    """Copies hold at least 90 % of the planned iterations' samples, which can leave a floor
    just above target: the flag names the copies, not an iteration cap that was never hit."""
    shape = alignment.BlockShape(240, 10, 32, 1, True, 240 * 10 * 32)
    (single,) = alignment.plan_feedback([("b", shape)], max_cost=None)
    (plan,) = alignment.plan_feedback([("b", shape)], max_cost=None, allow_copies=True)
    assert single.floor.angle <= 4 and not single.notes
    assert plan.iterations * plan.copies < single.iterations and plan.floor.angle > 4
    assert plan.notes == (
        f"above target (noise copies: {plan.iterations} x {plan.copies} for "
        f"{single.iterations} iterations: {plan.floor.angle:.2f}° > 4°)",
    )
    assert not plan.capped
    # Just above: printed with the decimals that show it (4.00 read as a false flag).
    shape = alignment.BlockShape(40, 512, 32, 1, True, 40 * 512 * 32)
    (plan,) = alignment.plan_feedback([("b", shape)], max_cost=None, allow_copies=True)
    assert 4 < plan.floor.angle < 4.005
    assert plan.notes[0].endswith(f": {plan.floor.angle:.3f}° > 4°)")


def test_steps_to_an_angle_are_the_fewest_whose_averaged_floor_meets_it():
    """On a 3x3 conv on 2x2 maps (taps used at 1/4 to all positions), capped, on noise
    copies: the floor formula of the plain mean over n steps of what each step runs."""
    x = torch.randn(32, 64, 2, 2)
    shape = block_shape(dtp_ext.Conv2d(64, 64, 3, padding=1), x)
    (plan,) = alignment.plan_feedback(
        [("b", shape)], max_cost=8.0, backprop_macs=shape.macs, allow_copies=True
    )
    assert plan.capped and plan.copies > 1 and min(shape.tap_use) < 1 and plan.floor.angle > 4

    def averaged(steps):
        return noise_floor(
            shape.fan_in, shape.fan_out, shape.samples * plan.copies, plan.rate, plan.momentum,
            iterations=plan.iterations, average_decay=1.0, averaged_steps=steps,
            tap_use=shape.tap_use,
        ).angle  # fmt: skip

    for angle in (4.0, 1.0, plan.floor.angle, 30.0):
        n = plan.steps_to(angle)
        assert averaged(n) <= angle and (n == 1 or averaged(n - 1) > angle), angle
    assert plan.steps_to(plan.floor.angle) == alignment.PLAN_AVERAGED_STEPS
    # Past V's decorrelation the averaged tan^2 falls as 1 / steps.
    ratio = (math.tan(math.radians(plan.floor.angle)) / math.tan(math.radians(4.0))) ** 2
    assert plan.steps_to(4.0) == pytest.approx(alignment.PLAN_AVERAGED_STEPS * ratio, rel=0.02)
    assert plan.steps_to(plan.raw_floor.angle) == 1
    unstable = dataclasses.replace(plan, raw_floor=alignment.Floor(90.0, math.inf, False, 2.0))
    assert unstable.steps_to(4.0) is None
    assert dataclasses.replace(plan, iterations=0).steps_to(4.0) is None  # V never moves
    for bad in (0, -1, 90, float("nan"), "4"):
        with pytest.raises(ValueError, match="steps_to: angle"):
            plan.steps_to(bad)


def test_explain_says_which_cap_the_blocks_held_above_target_need():
    """At a feedback-only step under a cap the target does not fit: the cap printed gives
    every block the iterations its target needs (a hundredth less does not), and the steps
    after which the averages of the blocks above target meet it at these plans, in all and
    from here; without averaging, no steps; with no block capped, no cap line. Setting a cap
    on the trainer plans again."""
    torch.manual_seed(0)
    model = small_net()
    x = torch.randn(32, 1, 8, 8)

    def feedback_only_explain(trainer, steps=2):
        for _ in range(steps):
            model(x)
            trainer.step()
        model(x)
        text = trainer.explain()
        assert "a feedback-only step" in text
        return text

    trainer = dtp_ext.FeedbackTrainer(model, max_cost=None, feedback_only_max_cost=1.0)
    text = feedback_only_explain(trainer, steps=3)
    above = [p for p in trainer.plans.values() if p.floor.angle > 4]
    capped = [p for p in above if p.capped]
    assert capped
    line = next(s for s in text.splitlines() if "above target for the cost cap" in s)
    cap = float(line.split("feedback_only_max_cost=")[1].split()[0])
    assert line == (
        f"  {len(capped)} block(s) above target for the cost cap: feedback_only_max_cost="
        f"{cap:.2f} (x a backprop step) lifts it (its plans meet the target after 100 steps)"
    )
    steps = {p.name: p.steps_to(4.0) for p in above}
    held = {n: trainer._averages.steps(n) for n in steps}
    assert set(held.values()) == {3.0}  # the plain mean of the three steps so far
    left = max(steps[n] - held[n] for n in steps)
    assert (
        f"  at these plans the averages of the {len(above)} block(s) above target meet it "
        f"after ~{max(steps.values())} feedback-only steps in all, ~{math.ceil(left)} from here"
    ) in text
    # Set on the trainer, the printed cap lifts it at the next plan; a hundredth less does not.
    trainer.feedback_only_max_cost = cap
    text = feedback_only_explain(trainer, steps=0)
    assert not any(p.capped for p in trainer.plans.values()) and "for the cost cap" not in text
    trainer.feedback_only_max_cost = cap - 0.01
    feedback_only_explain(trainer, steps=0)
    assert any(p.capped for p in trainer.plans.values())
    text = feedback_only_explain(
        dtp_ext.FeedbackTrainer(model, feedback_only_max_cost=1.0, average_decay=None)
    )
    assert "for the cost cap: feedback_only_max_cost=" in text
    assert "meet the target after" not in text and "feedback-only steps" not in text
    # A training step's line names max_cost, and no steps (W moves).
    trainer = dtp_ext.FeedbackTrainer(model, max_cost=1.0)
    model(x)
    text = trainer.explain()
    assert "a training step" in text and "for the cost cap: max_cost=" in text
    assert "feedback-only steps" not in text and "meet the target after" not in text


def test_explain_counts_the_warm_starts_due_once():
    """The first step's warm starts cost far more than a step: explain() adds them up while
    they are due, and says per block once they have run."""
    torch.manual_seed(0)
    model = small_net()
    x = torch.randn(32, 1, 8, 8)
    trainer = dtp_ext.FeedbackTrainer(model)
    model(x)
    text = trainer.explain()
    plans = trainer.plans
    backprop = 3 * sum(block_shape(b, b.recorded_input).macs for _, b in dtp_ext.dtp_blocks(model))
    warm = sum(p.warm_start_iterations * 4 * p.shape.macs for p in plans.values())
    assert warm > 0 and sum(p.warm_start_cost for p in plans.values()) == warm
    assert (
        f"; the warm starts due add {warm / 1e9:.3g} G to this step, "
        f"{warm / backprop:.3g}x a backprop step's (once)"
    ) in text
    assert "(run at its first step)" not in text
    trainer.step()
    model(x)
    text = trainer.explain()
    assert "warm starts due" not in text
    assert text.count("(run at its first step)") == len(trainer.plans)


def test_explain_previews_a_warm_up_before_the_first_step():
    """explain(feedback_only=True) before the first step shows the plans a warm-up's steps will
    run (the first step is a training step's); the steps run what it and explain() showed."""
    torch.manual_seed(0)
    model = small_net()
    x = torch.randn(32, 1, 8, 8)
    trainer = dtp_ext.FeedbackTrainer(model)
    model(x)
    text = trainer.explain(feedback_only=True)
    assert "plans for a feedback-only step (the next step is a training one):" in text
    assert "warm starts due" not in text  # they run with the training step's plans
    preview = dict(trainer.plans)
    text = trainer.explain()
    assert "plans for the next step, a training step:" in text and "warm starts due" in text
    training = dict(trainer.plans)
    assert training != preview
    trainer.step()
    assert dict(trainer.plans) == training
    model(x)
    trainer.step()
    assert dict(trainer.plans) == preview
    with pytest.raises(ValueError, match="feedback_only must be None, True or False"):
        trainer.explain(feedback_only="yes")


def test_blocks_given_no_iterations_are_left_out_of_the_steps():
    """A block given 0 iterations never moves: no number of warm-up steps brings it to target
    (steps_to None), and explain() counts only the others."""
    torch.manual_seed(0)
    model = small_net()
    model(torch.randn(32, 1, 8, 8))
    trainer = dtp_ext.FeedbackTrainer(model, iterations=[0, 1, 0])
    text = trainer.explain(feedback_only=True)
    plans = trainer.plans
    frozen = [p for p in plans.values() if p.iterations == 0 and p.floor.angle > 4]
    assert frozen and all(p.steps_to(4.0) is None for p in frozen)
    moving = [p for p in plans.values() if p.iterations and p.floor.angle > 4]
    assert (f"the averages of the {len(moving)} block(s) above target meet it after ~") in text


def test_settings_plans_are_made_with_plan_again_when_set():
    """target_angle, max_cost, feedback_only_max_cost and momentum set on a trainer take effect
    at the next step (they were kept but the plans were not made again), and are checked."""
    torch.manual_seed(0)
    model = small_net()
    x = torch.randn(32, 1, 8, 8)
    trainer = dtp_ext.FeedbackTrainer(model)
    model(x)
    trainer.step()
    model(x)
    trainer.step()
    first = dict(trainer.plans)  # a feedback-only step's (the forward weights stay put)
    for name, value in (("feedback_only_max_cost", 1.0), ("target_angle", 30.0), ("momentum", 0.5)):
        setattr(trainer, name, value)
        model(x)
        trainer.step()
        assert getattr(trainer, name) == value
        plans = dict(trainer.plans)
        assert plans != first, name
        first = plans
    for name, bad in (
        ("target_angle", 90),
        ("max_cost", -1.0),
        ("feedback_only_max_cost", float("nan")),
        ("momentum", 1.0),
        ("max_cost", True),
    ):
        with pytest.raises(ValueError, match=f"FeedbackTrainer: {name} must be"):
            setattr(trainer, name, bad)


def test_a_block_that_no_cap_brings_to_target_is_counted_apart():
    """A block whose target 200 iterations a step do not meet: raising the cap alone does not
    bring it there, and the line says so."""
    shape = alignment.BlockShape(4096, 4096, 32, 1, True, 4096 * 4096 * 32)
    (plan,) = alignment.plan_feedback([("b", shape)], max_cost=1.0, backprop_macs=shape.macs)
    assert plan.capped and not plan.uncapped_meets_target
    (free,) = alignment.plan_feedback([("b", shape)], max_cost=None)
    assert free.iterations == alignment.MAX_PLANNED_ITERATIONS and free.floor.angle > 4
    assert plan.uncapped_cost == free.cost
    layers = [nn.Linear(4096, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10)]
    model = dtp_ext.convert(nn.Sequential(*layers))
    model(torch.randn(32, 4096, requires_grad=True))
    trainer = dtp_ext.FeedbackTrainer(model, max_cost=1.0)
    assert (
        "x a backprop step) lifts it, though '0' would stay above target at 200 iterations a step"
    ) in trainer.explain()
    # Where none of the capped blocks gets there: no "lifts it".
    trainer = dtp_ext.FeedbackTrainer(model, max_cost=1.0, blocks=["0"])
    assert (
        "x a backprop step) gives them the most planned, 200 iterations a step, still above "
        in (trainer.explain())
    )


def test_feedback_only_steps_plan_under_their_own_cap():
    """A step whose forward weights did not move since the previous one (a feedback-only
    warm-up) is planned under feedback_only_max_cost, a training step under max_cost; the
    first step (nothing to compare with) and any step after an optimizer step are training
    steps."""
    torch.manual_seed(0)
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = dtp_ext.FeedbackTrainer(model)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))

    def step(update, first=False):
        out = model(x)
        text = trainer.explain()
        report = trainer.step()
        if update:
            opt.zero_grad()
            F.cross_entropy(out, y).backward()
            opt.step()
        plans = trainer.plans
        assert list(report.losses) == ["2", "5", "7"]
        for n, p in plans.items():  # what ran is what the plan says
            warm = p.warm_start_iterations if first else 0
            assert report.losses[n].numel() == p.iterations + warm, n
        cost = sum(p.cost for p in plans.values()) / backprop()
        # Noise samples per step: iterations on `copies` copies of the batch each.
        return text, {n: p.iterations * p.copies for n, p in plans.items()}, cost

    def backprop():
        return 3 * sum(block_shape(b, b.recorded_input).macs for _, b in dtp_ext.dtp_blocks(model))

    text, first, cost = step(False, first=True)
    assert "a training step" in text and cost <= 3.0 * (1 + 1e-9)
    text, warmup, cost = step(False)
    assert "a feedback-only step" in text
    assert 3.0 < cost <= alignment.DEFAULT_FEEDBACK_ONLY_MAX_COST * (1 + 1e-9)
    assert all(warmup[n] >= first[n] for n in first) and warmup != first
    _, again, _ = step(True)  # W has not moved yet at this step: still feedback-only
    assert again == warmup
    text, training, cost = step(False)
    assert "a training step" in text and training == first
    # A frozen block does not make a step feedback-only while the others train.
    for p in model[7].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    step(True)
    _, frozen, _ = step(True)
    assert frozen == first


def test_explicit_settings_win_and_keep_the_papers_semantics():
    """All three settings given: used as given, no averaging, no warm start (the paper's
    loop); one given: kept, the others planned."""
    torch.manual_seed(0)
    model = small_net()
    model(torch.randn(16, 1, 8, 8))
    paper = dtp_ext.FeedbackTrainer(model, [3, 4, 5], 0.1, [1e-3, 2e-3, 3e-3])
    assert paper.explain()
    assert [(p.iterations, p.lr) for p in paper.plans.values()] == [(3, 1e-3), (4, 2e-3), (5, 3e-3)]
    assert paper._averages is None and paper.warm_start is False
    mixed = dtp_ext.FeedbackTrainer(model, lr=1e-3)
    mixed.explain()
    assert all(
        p.lr == 1e-3 and p.planned == ("iterations", "noise_std") for p in mixed.plans.values()
    )
    assert mixed._averages is not None and mixed.warm_start
    # A None entry of a per-block list: that block's value planned, the others' kept.
    per_block = dtp_ext.FeedbackTrainer(model, iterations=[None, 2, None], lr=[1e-3, None, None])
    per_block.explain()
    plans = list(per_block.plans.values())
    assert [p.planned for p in plans] == [
        ("iterations", "noise_std"),
        ("noise_std", "lr"),
        ("iterations", "noise_std", "lr"),
    ]
    assert plans[0].lr == 1e-3 and plans[1].iterations == 2
    assert per_block._averages is not None and per_block.warm_start
    with pytest.raises(ValueError, match="iterations entries must be finite numbers >= 0"):
        dtp_ext.FeedbackTrainer(model, iterations=[None, float("nan"), 1])


def test_planned_settings_are_never_unstable_where_explicit_ones_would_be():
    """vgg11_bn's 512 -> 4096 classifier layer at batch 32: one lr for every block is unstable
    there; the plan lowers that block's lr until its floor is stable."""
    block = dtp_ext.Linear(512, 4096)
    x = torch.randn(32, 512)
    shape = block_shape(block, x)
    assert not noise_floor(shape.fan_in, shape.fan_out, shape.samples, 0.01, 0.9).stable
    (plan,) = alignment.plan_feedback([("cls", shape)])
    assert plan.floor.stable and plan.raw_floor.load <= alignment.STABILITY_LOAD + 1e-9


def averaged_reference(block, x, k, sigma, lr, steps, warm):
    """The same feedback loop with torch.optim.SGD (reference.feedback_loop), the first step
    preceded by `warm` = (iterations, lr), and the average written out: a plain mean while W
    does not move."""
    state = average = v = None
    for n in range(1, steps + 1):
        for its, rate in ([warm] if n == 1 else []) + [(k, lr)]:
            v, c, _, state = reference.feedback_loop(
                block, x, its, sigma, rate, 0.9, optimizer_state=state
            )
            for group in state["param_groups"]:
                group["lr"] = lr
            block.feedback_weight.copy_(v)
            block.feedback_bias.copy_(c)
        average = v.clone() if average is None else average + (v - average) / n
    return v, average


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
        ],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_average_equals_the_mean_of_the_reference_loops_weights(device):
    """The trainer's average is the mean of the feedback weights its steps produced (on the
    device's fused loop), and on the CPU those weights are the reference loop's (same noise)."""
    torch.manual_seed(0)
    block = dtp_ext.Conv2d(3, 5, 3, padding=1).double().to(device)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, device=device)
    ref_block = copy.deepcopy(block).cpu()
    trainer = dtp_ext.FeedbackTrainer(
        nn.Sequential(block), 3, 0.2, 0.05, average_decay=0.9, warm_start=True, blocks=[block]
    )
    torch.manual_seed(5)
    block(x)
    weights = []
    for _ in range(4):
        trainer.step()
        weights.append(block.feedback_weight.clone())
    mean = weights[0]
    for n, w in enumerate(weights[1:], 2):
        mean = mean + (w - mean) / n
    torch.testing.assert_close(block.feedback_weight_average, mean, rtol=1e-12, atol=1e-14)
    assert block.target_feedback_weight is block.feedback_weight_average
    if device == "cpu":
        plan = trainer.plans["0"]
        torch.manual_seed(5)
        warm = (plan.warm_start_iterations, plan.warm_start_lr)
        v, average = averaged_reference(ref_block, x.cpu(), 3, 0.2, 0.05, 4, warm)
        torch.testing.assert_close(block.feedback_weight, v, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(block.feedback_weight_average, average, rtol=1e-12, atol=1e-12)


def test_targets_use_the_averaged_feedback_weight():
    """The DTP backward propagates with the average: it equals the reference's targets with
    the average put in place of V, and differs from those with V."""
    torch.manual_seed(0)
    model = nn.Sequential(dtp_ext.Linear(6, 5), nn.Tanh(), dtp_ext.Linear(5, 4)).double()
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    trainer = dtp_ext.FeedbackTrainer(
        model, 3, 0.1, 0.3, average_decay=0.9, warm_start=True, blocks=["2"]
    )
    for _ in range(3):
        model(x)
        trainer.step()
    top = model[2]
    assert not torch.equal(top.feedback_weight_average, top.feedback_weight)
    y = torch.randint(0, 4, (8,))
    model(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    with_average = copy.deepcopy(model)
    with_average[2].feedback_weight_average = None
    with_average[2].feedback_weight.copy_(top.feedback_weight_average)
    (expected,) = torch.autograd.grad(F.cross_entropy(with_average(x), y), x)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    raw = copy.deepcopy(model)
    raw[2].feedback_weight_average = None
    (other,) = torch.autograd.grad(F.cross_entropy(raw(x), y), x)
    assert not torch.allclose(grad, other)


def test_average_follows_a_moving_forward_weight_with_its_decay():
    """Once W moves between steps the average is exponential: weight 1 - decay per step."""
    torch.manual_seed(0)
    block = dtp_ext.Linear(6, 4).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    trainer = dtp_ext.FeedbackTrainer(
        nn.Sequential(block), 2, 0.1, 0.2, average_decay=0.8, warm_start=True, blocks=[block]
    )
    block(x)
    trainer.step()
    block(x)
    for _ in range(30):
        before = block.feedback_weight_average
        before = None if before is None else before.clone()
        with torch.no_grad():
            block.weight.mul_(1.001)  # the optimizer's in-place step
        trainer.step()
    v = block.feedback_weight
    torch.testing.assert_close(block.feedback_weight_average, before + (v - before) * 0.2)


def test_default_average_keeps_a_window_while_w_drifts_slowly_and_drops_it_when_fast():
    """The default (decay 0.9): the plain mean while W stays put; a window of at most 10 steps
    while W moves by at most MAX_DRIFT a step; V itself (the average restarts from it) after a
    step that moved W more."""
    block, x, trainer = one_linear_block(dtype=torch.float64)
    assert trainer._averages.decay == alignment.DEFAULT_AVERAGE_DECAY == 0.9
    for _ in range(3):
        trainer.step()
    assert trainer._averages.steps("0") == 3
    for _ in range(12):
        with torch.no_grad():
            block.weight.mul_(1.001)  # drift 0.001: well below MAX_DRIFT
        block(x)
        trainer.step()
    assert trainer._averages.steps("0") == pytest.approx(10)  # capped by the decay
    assert not torch.equal(block.feedback_weight_average, block.feedback_weight)
    with torch.no_grad():
        block.weight.mul_(1.0 + 2 * averaging.MAX_DRIFT)
    block(x)
    trainer.step()
    assert trainer._averages.steps("0") == 1
    assert torch.equal(block.feedback_weight_average, block.feedback_weight)
    with torch.no_grad():
        block.weight.mul_(1.001)
    block(x)
    trainer.step()  # slow again: the window grows from V
    assert trainer._averages.steps("0") == 2


def test_decay_zero_drops_the_average_once_the_forward_weight_moves():
    block, _, trainer = one_linear_block(average_decay=0.0)
    for _ in range(3):
        trainer.step()
    assert trainer._averages.steps("0") == 3
    assert not torch.equal(block.feedback_weight_average, block.feedback_weight)
    with torch.no_grad():
        block.weight.mul_(1.0001)
    trainer.step()
    assert trainer._averages.steps("0") == 0  # dropped: targets use V, nothing copied
    assert block.feedback_weight_average is None
    assert block.target_feedback_weight is block.feedback_weight


def test_average_window_shrinks_where_the_forward_weight_drifts_fast():
    """A W that moves 0.9 % a step (below MAX_DRIFT) gets the window where lag and noise
    balance, (noise_per_step / drift^2)^(1/3) steps, below the decay's 1 / (1 - decay)."""
    block, x, trainer = one_linear_block(dtype=torch.float64, average_decay=0.999)
    for _ in range(5):
        trainer.step()
    assert trainer._averages.steps("0") == 5  # W fixed: the plain mean of every step
    for _ in range(30):
        with torch.no_grad():
            block.weight.mul_(1.009)
        block(x)
        trainer.step()
    noise = trainer.plans["0"].noise_per_step
    window = (noise / (0.009 / 1.009) ** 2) ** (1 / 3)
    assert 1 < window < 35  # the count (35) is above it: the window binds
    assert trainer._averages.steps("0") == pytest.approx(window)


def rng_state(device):
    """The generator state the device's noise comes from."""
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


def set_rng_state(device, state):
    (torch.cuda.set_rng_state if device == "cuda" else torch.set_rng_state)(state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "trainer_first", [False, True], ids=["model-loaded-first", "trainer-first"]
)
@pytest.mark.parametrize(
    "feedback_only, split, decay",
    [(0, 3, "auto"), (4, 2, "auto"), (4, 4, "auto"), (2, 4, 0.9)],
    ids=["training", "inside-warm-up", "at-warm-up-end", "window-decay-0.9"],
)
def test_resume_with_averages_is_bitwise(feedback_only, split, decay, trainer_first, device):
    """Saved and resumed at step `split` of 6, the first `feedback_only` steps training the
    feedback alone (the averages grow), then forward training (the default drops them, decay
    0.9 keeps a drift-balanced window): the same weights and averages as an unbroken run,
    whichever of the model and the trainer is loaded first (loading the model bumps its
    weights' version counters: the next step must still know that W did not move)."""

    def run(split):
        torch.manual_seed(0)
        model = small_net().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        trainer = dtp_ext.FeedbackTrainer(model, average_decay=decay)
        data = torch.randn(6, 16, 1, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
        labels = torch.randint(0, 10, (6, 16), generator=torch.Generator().manual_seed(2))
        labels = labels.to(device)
        for i in range(6):
            if i == split:
                state = copy.deepcopy(
                    (
                        model.state_dict(),
                        opt.state_dict(),
                        trainer.state_dict(),
                        rng_state(device),
                    )
                )
                model = small_net().to(device)
                trainer = dtp_ext.FeedbackTrainer(model, average_decay=decay)
                if trainer_first:
                    trainer.load_state_dict(state[2])
                model.load_state_dict(state[0])
                opt = torch.optim.SGD(model.parameters(), lr=0.05)
                opt.load_state_dict(state[1])
                if not trainer_first:
                    trainer.load_state_dict(state[2])
                set_rng_state(device, state[3])
            out = model(data[i])
            trainer.step()
            if i >= feedback_only:
                opt.zero_grad()
                F.cross_entropy(out, labels[i]).backward()
                opt.step()
        return model, trainer

    (a, ta), (b, tb) = run(None), run(split)
    if decay != "auto":
        assert all(
            block.feedback_weight_average is not None
            for _, block in list(dtp_ext.dtp_blocks(a))[1:]
        )
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    for name, block in dtp_ext.dtp_blocks(a):
        other = dict(dtp_ext.dtp_blocks(b))[name]
        if block.feedback_weight_average is not None:
            assert torch.equal(block.feedback_weight_average, other.feedback_weight_average), name
    assert ta._averages.counts.keys() == tb._averages.counts.keys()
    for name, count in ta._averages.counts.items():
        assert torch.equal(count, tb._averages.counts[name])


def test_warm_start_brings_a_random_feedback_weight_to_its_floor_at_the_first_step():
    block, _, trainer = one_linear_block()
    report = trainer.step()
    plan = next(iter(trainer.plans.values()))
    assert report.losses["0"].numel() == plan.warm_start_iterations + plan.iterations
    row = report.alignment()["0"]
    assert row["raw_angle"] < plan.raw_floor.angle + 10 and row["status"] == "ok"
    second = trainer.step()  # no warm start again (W did not move: a feedback-only step's plan)
    assert second.losses["0"].numel() == trainer.plans["0"].iterations


def test_report_alignment_measures_what_the_block_holds():
    torch.manual_seed(0)
    block = dtp_ext.Conv2d(3, 4, 3)
    trainer = dtp_ext.FeedbackTrainer(nn.Sequential(block), 2, 0.1, 1e-3, blocks=[block])
    block(torch.randn(4, 3, 6, 6))
    row = trainer.step().alignment()["0"]
    w, v = block.weight.double(), block.feedback_weight.double()
    assert row["raw_angle"] == pytest.approx(dtp_ext.metrics.angle_degrees(w, v))
    assert row["raw_norm_ratio"] == pytest.approx(float(v.norm() / w.detach().norm()))
    assert row["angle"] == row["raw_angle"]  # no averaging with all three settings given
    assert row["status"] == "settling"  # still near its random start, far above its floor
    plan = trainer.plans["0"]
    assert row["predicted_angle"] == plan.raw_floor.angle
    assert row["predicted_norm_ratio"] == plan.raw_floor.norm_ratio


def test_status_unstable_only_while_the_norm_ratio_is_not_falling():
    """A V above twice its predicted |V|/|W| is unstable while that ratio grows, settling while
    it falls: after the first (training) step a feedback-only plan predicts a floor far below
    the one V sits at (73.6 degrees, |V|/|W| 3.4, against 40 degrees, 1.3) and V takes its
    transient to get there: no false alarm."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        dtp_ext.Linear(512, 16),
        nn.ReLU(),
        dtp_ext.Linear(16, 10),
    )
    trainer = dtp_ext.FeedbackTrainer(model)
    reports = []
    for _ in range(4):
        model(torch.randn(8, 3, 8, 8))
        reports.append(trainer.step())
    rows = [r.alignment()["3"] for r in reports]
    assert rows[0]["status"] == "ok"  # at the training plan's own (high) floor
    for before, row in zip(rows[:2], rows[1:3]):  # the feedback-only steps: above twice...
        assert row["raw_norm_ratio"] > 2 * row["predicted_norm_ratio"]
        assert row["raw_norm_ratio"] < before["raw_norm_ratio"] and row["status"] == "settling"
    # The same measurement, read as growing since the previous step: unstable.
    last = reports[1]
    last._previous["3"] = last._quality["3"] * torch.tensor([0.5, 1, 1, 1, 1], dtype=torch.float64)
    last._alignment = None
    assert last.alignment()["3"]["status"] == "unstable"


def test_warns_once_when_forward_weights_move_before_their_feedback_is_trained():
    torch.manual_seed(0)
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = dtp_ext.FeedbackTrainer(model, 1, 0.1, 1e-3)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()  # the wrong order: backward before step()
    opt.step()
    with pytest.warns(RuntimeWarning, match="random feedback weight"):
        trainer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            trainer.step()
    # The recommended order warns nothing.
    model = small_net()
    trainer = dtp_ext.FeedbackTrainer(model, 1, 0.1, 1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            out = model(x)
            trainer.step()
            F.cross_entropy(out, y).backward()
            opt.step()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_angle": 0}, "target_angle must be a number of degrees"),
        ({"target_angle": 90}, "target_angle must be a number of degrees"),
        ({"max_cost": 0}, "max_cost must be None or a finite number > 0"),
        ({"max_cost": float("inf")}, "max_cost must be None or a finite number > 0"),
        ({"feedback_only_max_cost": -1}, "feedback_only_max_cost must be None or a finite"),
        ({"feedback_only_max_cost": float("nan")}, "feedback_only_max_cost must be None or a"),
        ({"average_decay": 1.0}, "average_decay must be 'auto', None or a number in"),
        ({"average_decay": "yes"}, "average_decay must be 'auto', None or a number in"),
        ({"warm_start": 1}, "warm_start must be 'auto', True or False"),
    ],
)
def test_bad_planning_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dtp_ext.FeedbackTrainer(small_net(), **kwargs)


def test_noise_floor_refuses_bad_input():
    with pytest.raises(ValueError, match="fan_in must be a finite number > 0"):
        noise_floor(0, 3, 10, 0.01)
    with pytest.raises(ValueError, match="samples must be a whole number >= 1"):
        noise_floor(3, 3, 2.5, 0.01)
    for bad in (dict(rate=True), dict(momentum=True)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
            noise_floor(3, 3, 10, **{"rate": 0.01, **bad})
    with pytest.raises(ValueError, match="iterations must be an int >= 0"):
        noise_floor(3, 3, 10, 0.01, iterations=-3)
    with pytest.raises(ValueError, match="averaged_steps must be None or a number >= 1"):
        noise_floor(3, 3, 10, 0.01, iterations=2, average_decay=1.0, averaged_steps=-5)
    with pytest.raises(ValueError, match="tap_use must be fractions in"):
        noise_floor(3, 3, 10, 0.01, tap_use="abc")
    # Numbers of other numeric types, and a scalar tap use, are what they say.
    expected = noise_floor(3, 3, 8, 0.05, tap_use=(0.5,))
    assert noise_floor(3, 3, np.int64(8), np.float64(0.05), tap_use=0.5) == expected
    assert noise_floor(3.0, 3.0, 8.0, 0.05, tap_use=[0.5]) == expected
    with pytest.raises(ValueError, match="tap_use must be fractions in"):
        noise_floor(3, 3, 10, 0.01, tap_use=(0.0, 0.0))
    with pytest.raises(ValueError, match="tap_use must be fractions in"):
        noise_floor(3, 3, 10, 0.01, tap_use=(1.5,))
    with pytest.raises(ValueError, match="rate must be a finite number >= 0"):
        noise_floor(3, 3, 10, float("nan"))
    with pytest.raises(ValueError, match="momentum must be in"):
        noise_floor(3, 3, 10, 0.01, 1.0)


def test_zero_iterations_with_a_planned_lr_train_nothing():
    """iterations=0 leaves the feedback as it is, warm start included, whatever is planned."""
    torch.manual_seed(0)
    model = small_net()
    before = {n: b.feedback_weight.clone() for n, b in dtp_ext.dtp_blocks(model)}
    trainer = dtp_ext.FeedbackTrainer(model, iterations=0)
    model(torch.randn(8, 1, 8, 8))
    report = trainer.step()
    assert all(losses.numel() == 0 for losses in report.losses.values())
    for name, block in dtp_ext.dtp_blocks(model):
        assert torch.equal(block.feedback_weight, before[name]), name


def test_noise_copies_rule_and_floor():
    """Few rows per iteration: a plan of a fixed W runs K' iterations on S copies of the batch
    instead of K iterations on it, rows (batch x positions x S) at most NOISE_COPY_ROWS, K' S
    the most samples up to K (never more), and the same predicted floor; a training plan, and
    given iterations, run on the batch."""
    linear = alignment.BlockShape(512, 4096, 32, 1, True, 32 * 512 * 4096)
    assert alignment.noise_copies(linear, 40) == (4, 10)
    assert alignment.noise_copies(linear, 7) == (1, 7)
    assert alignment.noise_copies(linear, 1) == (1, 1)
    assert alignment.noise_copies(linear, 37) == (3, 12)  # 36 of 37: 16 copies would hold 32
    rows = alignment.NOISE_COPY_ROWS
    two = dataclasses.replace(linear, batch=rows // 2)  # room for 2 copies: odd K stays whole
    assert alignment.noise_copies(two, 4) == (2, 2)
    assert alignment.noise_copies(two, 5) == (5, 1)  # 2 x 2 would keep 4 of 5 samples
    wide = alignment.BlockShape(64, 64, 32, 196, True, 32 * 196 * 64 * 64)
    assert alignment.noise_copies(wide, 40) == (40, 1)
    for k in (2, 7, 16, 33):
        (plan,) = alignment.plan_feedback(
            [("b", linear)], iterations=[k], max_cost=None, allow_copies=True
        )
        assert plan.copies == 1 and plan.iterations == k  # given iterations are never copied
    (training,) = alignment.plan_feedback([("b", linear)], max_cost=None)
    (plan,) = alignment.plan_feedback([("b", linear)], max_cost=None, allow_copies=True)
    assert training.copies == 1 and plan.copies > 1
    assert plan.iterations * plan.copies <= training.iterations
    single = alignment.noise_floor(
        512,
        4096,
        32,
        plan.rate / plan.copies,
        iterations=plan.iterations * plan.copies,
        average_decay=1.0,
        averaged_steps=alignment.PLAN_AVERAGED_STEPS,
    )
    assert plan.floor.angle == pytest.approx(single.angle, rel=0.05)
    # The window rule's noise per step is the planned average's, copies and tap use included.
    n = alignment.PLAN_AVERAGED_STEPS
    assert plan.noise_per_step / n == pytest.approx(
        math.tan(math.radians(plan.floor.angle)) ** 2, rel=1e-6
    )
    conv = block_shape(dtp_ext.Conv2d(64, 64, 3, padding=1), torch.empty(8, 64, 2, 2))
    (small,) = alignment.plan_feedback([("c", conv)], max_cost=None, allow_copies=True)
    assert small.noise_per_step / n == pytest.approx(
        math.tan(math.radians(small.floor.angle)) ** 2, rel=1e-6
    )


@pytest.mark.parametrize("device", DEVICES)
def test_a_planned_block_with_noise_copies_runs_on_copies_of_its_batch(device):
    """At a feedback-only step what ran is the loop on S copies of the recorded batch: bitwise
    the feedback weight of a trainer given the plan's iterations and lr on the repeated batch
    from the same state, same seed; the training step before it ran on the batch itself.
    noise= for such a block is refused (it gives the batch's own noise)."""
    torch.manual_seed(0)
    block = dtp_ext.Linear(64, 10).to(device)
    x = torch.randn(32, 64, device=device)
    trainer = dtp_ext.FeedbackTrainer(nn.Sequential(block), blocks=[block], warm_start=False)
    block(x)
    trainer.step()  # the first step is a training step's: on the batch itself
    assert trainer.plans["0"].copies == 1
    text = trainer.explain()  # the next step's: feedback-only (W did not move)
    plan = trainer.plans["0"]
    assert plan.copies > 1 and f"each iteration on {plan.copies} noise copies" in text
    twin = copy.deepcopy(block)
    given = dtp_ext.FeedbackTrainer(
        nn.Sequential(twin),
        plan.iterations,
        plan.noise_std,
        plan.lr,
        blocks=[twin],
        warm_start=False,
        average_decay=None,
    )
    # The training step's plan had another lr: its momentum starts afresh (zero), as given's.
    assert plan.lr != trainer._buffer_lr["0"]
    twin(torch.cat([x] * plan.copies))
    torch.manual_seed(1)
    report = trainer.step()
    torch.manual_seed(1)
    given.step()
    assert report.losses["0"].numel() == plan.iterations
    assert torch.equal(block.feedback_weight, twin.feedback_weight)
    noise = (
        torch.zeros(plan.iterations, 32, 64, device=device),
        torch.zeros(plan.iterations, 32, 10, device=device),
    )
    with pytest.raises(ValueError, match="noise copies of its batch, but noise= gives"):
        trainer.step(noise={"0": noise})


def kick_net():
    """A small net whose 128 -> 16 layer runs on 39 noise copies of its batch of 8 at a
    feedback-only step, at 22x its first (training) step's lr."""
    return nn.Sequential(
        dtp_ext.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        dtp_ext.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        dtp_ext.Linear(128, 16),
        nn.ReLU(),
        dtp_ext.Linear(16, 10),
    )


def test_a_planned_lr_that_changes_starts_the_momentum_afresh():
    """A feedback-only warm-up brings V towards its floor from the first step on: the momentum
    the training step's plan left, applied at the feedback-only plan's 22x larger lr, kicked V
    away (raw angle 25.6 -> 56 degrees in six steps, its average worse for ~30 steps). What
    ran is the loop from zero buffers; a given lr keeps them."""
    torch.manual_seed(0)
    model = kick_net()
    trainer = dtp_ext.FeedbackTrainer(model)
    torch.manual_seed(5)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(7)]
    model(batches[0])
    start = trainer.step().alignment()["5"]["raw_angle"]
    assert trainer.plans["5"].copies == 1
    model(batches[1])
    trainer.explain()  # plans the feedback-only step
    plan = trainer.plans["5"]
    assert plan.copies > 1 and plan.lr > 10 * trainer._buffer_lr["5"]
    angles = []
    for x in batches[1:]:
        model(x)
        angles.append(trainer.step().alignment()["5"]["raw_angle"])
    assert max(angles) < start + 2, (start, angles)


@pytest.mark.parametrize(
    "momentum", [0.0, 0.5, pytest.param(0.999, marks=pytest.mark.integration)]
)  # 0.999: ~10^4 warm-start iterations (sqrt(momentum) per iteration at best)
def test_planned_settings_hold_their_floor_at_any_momentum(momentum):
    """The planned step rate scales with 1 - momentum (the same floor constant): at momentum 0
    the warm start and the plan's floor agree from the first step (the critical-rate warm
    start left V at 73 degrees against a predicted 8, still 32 after 32 steps), and at 0.999 the
    plans stay well inside stability (|V|/|W| ~16 against a predicted 2 without the scaling)."""
    torch.manual_seed(0)
    model = kick_net()
    trainer = dtp_ext.FeedbackTrainer(model, momentum=momentum)
    torch.manual_seed(3)
    for _ in range(3):
        model(torch.randn(8, 3, 8, 8))
        rows = trainer.step().alignment()
        for name, row in rows.items():
            plan = trainer.plans[name]
            assert plan.raw_floor.stable and plan.raw_floor.load <= alignment.STABILITY_LOAD + 1e-9
            assert row["raw_angle"] < row["predicted_angle"] + 10, (name, row)
            assert row["status"] == "ok", (name, row)
    assert alignment.step_rate(0.9) == alignment.STEP_RATE


def test_warns_once_when_a_smaller_batch_makes_a_plan_unstable():
    """Plans are kept for the batch they were made for; batches small enough to push a block's
    load c * fan_out / (B P) to 1 or more, two steps in a row, are warned about once, naming it
    (a half batch is not, nor one small batch between full ones: an epoch's last)."""
    torch.manual_seed(0)
    model = kick_net()
    trainer = dtp_ext.FeedbackTrainer(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in (32, 32, 16, 1, 32):
            model(torch.randn(batch, 3, 8, 8))
            trainer.step()
        assert not [w for w in caught if "planned for a batch" in str(w.message)]
        for _ in range(3):
            model(torch.randn(1, 3, 8, 8))
            trainer.step()
    (warning,) = [str(w.message) for w in caught if "planned for a batch" in str(w.message)]
    assert "block '7''s feedback settings were planned for a batch of 32" in warning
    assert "unstable at the latest steps' 1" in warning and "drop_last=True" in warning
    assert trainer.plans["7"].raw_floor.load * 32 >= 1


def test_a_given_lr_changed_between_steps_keeps_the_momentum():
    """As torch.optim: a user's new lr applies to the buffers the old one left (the reference
    loop with its optimizer state carried over, same noise)."""

    def run(keep):
        torch.manual_seed(0)
        block = dtp_ext.Linear(16, 8).double()
        trainer = dtp_ext.FeedbackTrainer(
            nn.Sequential(block), 2, 0.1, 0.01, blocks=[block], warm_start=False
        )
        block(torch.randn(4, 16, dtype=torch.float64))
        torch.manual_seed(1)
        trainer.step()
        trainer.lr = 0.02
        if not keep:
            for b in trainer._momentum_buffers["0"].values():
                b.zero_()
        trainer.step()
        return block.feedback_weight

    kept = run(True)
    assert not torch.equal(kept, run(False))
    torch.manual_seed(0)
    block = dtp_ext.Linear(16, 8).double()
    x = torch.randn(4, 16, dtype=torch.float64)
    torch.manual_seed(1)
    state = None
    for lr in (0.01, 0.02):
        if state is not None:
            for group in state["param_groups"]:
                group["lr"] = lr
        v, c, _, state = reference.feedback_loop(block, x, 2, 0.1, lr, 0.9, optimizer_state=state)
        block.feedback_weight.copy_(v)
        block.feedback_bias.copy_(c)
    torch.testing.assert_close(kept, v, rtol=1e-12, atol=1e-12)
