"""The feedback weight's noise floor, and the per-block feedback settings planned from it
(docs/maths.md §7-§8).

L-DRL trains a feedback weight V by SGD with momentum on a noisy loss whose minimum is V = W^T.
At a constant lr V does not converge to W^T: it settles at V = W^T + E, E isotropic noise
orthogonal to W, at an angle theta from W^T that depends only on the block's shape, the noise
samples per iteration, the lr and the momentum (for a linear feedback path; approximately
otherwise). `noise_floor` predicts theta, |V|/|W| = 1/cos(theta) and whether the floor is
stable at all; `plan_feedback` picks, per block, the cheapest iterations and lr whose floor
(with the feedback weight averaged over steps) meets a target angle within a cost cap.
FeedbackTrainer uses both; `dtp-ext train` uses FeedbackTrainer's plan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from numbers import Integral

import torch

from .feedback.settings import finite_real

# Planned settings (docs/maths.md §8). Each block's lr x curvature x iterations per step: the
# 5 iterations at rate 0.01 that the position-scaled default used, spread over however many
# iterations the block gets (lr / S with K S iterations).
STEP_RATE = 0.05  # per step, at momentum 0.9 (other momenta: step_rate, the same floor constant)
DEFAULT_NOISE_STD = 0.1
DEFAULT_TARGET_ANGLE = 4.0  # degrees per block: ~20 degrees over the ~25 noisiest blocks
# Once the forward weights move, the average's window is capped at 1 / (1 - decay) steps (an
# average lags a moving W: docs/maths.md §7.3, measured); 0: targets use V itself then.
DEFAULT_AVERAGE_DECAY = 0.9
# Plans meet their target with the plain mean over this many steps of a fixed W (a
# feedback-only warm-up).
PLAN_AVERAGED_STEPS = 100
DEFAULT_MAX_COST = 3.0  # feedback multiply-adds per step / a backprop step's
# The cap at a feedback-only step (a warm-up: no forward update to pay for, and what its
# average reaches after PLAN_AVERAGED_STEPS steps is what training starts from): what the
# target needs on resnet18 at batch 32 (~18x); deeper or wider networks reach it after more
# warm-up steps instead (docs/maths.md §8).
DEFAULT_FEEDBACK_ONLY_MAX_COST = 32.0
MAX_PLANNED_ITERATIONS = 200
# Planned rates keep c * fan_out / samples at most this (the floor is unstable at 1).
STABILITY_LOAD = 0.5
# A warm start runs this many e-folds of the transient from the random initial V.
TRANSIENT_EFOLDS = 5.0
# At a feedback-only step a planned block with few samples per iteration runs its iterations on
# S copies of its batch (fresh noise each) at S times fewer iterations, batch x positions x S at
# most this: the same noise samples at the same floor (docs/maths.md §8), fewer passes over the
# weights. Measured (benchmarks/noise_copies.py): 1.6-4x faster for linear layers and 3x3 convs
# on 1x1 maps, slower once the rows pass ~1000.
NOISE_COPY_ROWS = 512
COPIES_KEEP = 0.9  # the share of the planned noise samples copies must keep


@dataclass(frozen=True)
class BlockShape:
    """What a block's feedback floor and cost depend on."""

    # The noise an iteration's gradient carries per feedback weight (docs/maths.md §7.1): the
    # inputs one output position reads, C_in / groups x the kernel taps inside the input (the
    # mean over the pairs a weight gradient sums, k*k away from the border; Linear:
    # in_features), and the outputs one input position feeds (likewise; k*k / stride^2-ish
    # for a strided kernel).
    fan_in: float
    fan_out: float
    batch: int  # samples in the recorded input (Linear: rows)
    positions: int  # output positions per sample, after the pool (Linear: 1)
    linear_feedback: bool  # no folded activation or pool: the floor formula is exact
    macs: int  # multiply-adds of one forward pass of the block on the batch
    # Per kernel tap (row-major), the fraction of output positions at which it reads inside the
    # input: a tap used at fewer positions learns more slowly (docs/maths.md §7.1). (1.0,): all
    # taps everywhere (Linear, or a map large enough to ignore the border).
    tap_use: tuple[float, ...] = (1.0,)

    @property
    def samples(self) -> int:
        """Noise samples one feedback iteration averages over: batch x positions."""
        return self.batch * self.positions


def _tap_geometry(size: int, kernel: int, stride: int, padding: int, dilation: int):
    """One spatial dimension of a convolution: (output size, mean taps inside the input over the
    (output, tap) pairs, mean output reads of an input position over the same pairs, each tap's
    fraction of output positions inside the input)."""
    out = max((size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1, 1)
    inside = [0] * out
    reads = [0] * size
    use = [0] * kernel
    for i in range(out):
        for t in range(kernel):
            q = i * stride - padding + t * dilation
            if 0 <= q < size:
                inside[i] += 1
                reads[q] += 1
                use[t] += 1
    pairs = max(sum(use), 1)
    return (
        out,
        sum(n * n for n in inside) / pairs,
        sum(n * n for n in reads) / pairs,
        [u / out for u in use],
    )


def block_shape(block, x: torch.Tensor) -> BlockShape:
    """The BlockShape of a DTP block on input `x` (in the kernels' layout: (rows, in) for a
    Linear, (N, C, H, W) for a Conv2d). Shapes only: nothing is computed."""
    weight = block.weight
    linear = block.activation in (None, "none") and not getattr(block, "pool", None)
    if weight.dim() == 2:
        out_features, in_features = weight.shape
        rows = x.shape[0]
        return BlockShape(
            in_features, out_features, rows, 1, linear, rows * in_features * out_features
        )
    out_channels, in_per_group, kh, kw = weight.shape
    groups = block.groups
    dims = [
        _tap_geometry(
            x.shape[2 + d], k, block.stride[d], block.numeric_padding[d], block.dilation[d]
        )
        for d, k in enumerate((kh, kw))
    ]
    (oh, in_h, out_h, use_h), (ow, in_w, out_w, use_w) = dims
    tap_use = tuple(a * b for a in use_h for b in use_w)
    pool = block.pool if block.pool and block.pool > 1 else 1
    positions = (oh // pool) * (ow // pool)
    return BlockShape(
        in_per_group * in_h * in_w,
        out_channels // groups * out_h * out_w,
        x.shape[0],
        max(positions, 1),
        linear and pool == 1,
        x.shape[0] * oh * ow * out_channels * in_per_group * kh * kw,
        (1.0,) if all(u == 1.0 for u in tap_use) else tap_use,
    )


def curvature(noise_std: float, positions: int) -> float:
    """Curvature of a block's expected L-DRL loss in its feedback weight, 2 sigma^2 P
    (docs/maths.md §7): lr x curvature is the fraction of the distance to W^T one plain SGD
    iteration covers."""
    return 2.0 * noise_std * noise_std * positions


def floor_constant(rate: float, momentum: float) -> float:
    """c of the floor formula: the stationary variance of SGD with momentum on a quadratic,
    per unit gradient noise, in units of 1 / curvature^2 x rate^2 (an AR(2) process;
    rate / (2 (1 - momentum)) for small rates). Infinite where the iteration itself diverges."""
    if rate <= 0:
        return 0.0
    if rate >= 2 * (1 + momentum):
        return math.inf
    return rate * (1 + momentum) / ((1 - momentum) * (2 * (1 + momentum) - rate))


def averaged_steps_weight(decay: float, steps: int | None) -> float:
    """Effective number of samples in a bias-corrected exponential average of `steps` values
    with `decay` (None: the stationary (1 + decay) / (1 - decay)); decay 1 is the plain mean
    of `steps` values (what the trainer keeps while the forward weights stay put)."""
    if decay == 1:
        if steps is None:
            raise ValueError("a plain mean (average_decay 1) needs averaged_steps")
        return float(max(steps, 0))
    if steps is None:
        return (1 + decay) / (1 - decay)
    if steps <= 0:
        return 0.0
    dn = decay**steps
    return (1 - dn) * (1 + decay) / ((1 - decay) * (1 + dn))


def averaging_gain(c: float, iterations: int, decay: float | None, steps: int | None) -> float:
    """How many times an average of V over steps lowers tan^2 of its angle: the average's
    effective samples times the fraction of them that are independent (V's iterates decorrelate
    over ~1 / (2c) iterations, so samples `iterations` apart count tanh(c iterations)); at
    least 1."""
    if decay is None or c <= 0 or not math.isfinite(c):
        return 1.0
    n = averaged_steps_weight(decay, steps)
    return max(1.0, n * math.tanh(c * iterations))


@dataclass(frozen=True)
class Floor:
    """A feedback weight's predicted stationary alignment."""

    angle: float  # degrees between V and W^T (90 where unstable)
    norm_ratio: float  # |V| / |W| = 1 / cos(angle) (inf where unstable)
    stable: bool
    load: float  # c * fan_out / samples: the floor is unstable from 1 on

    def describe(self) -> str:
        if not self.stable:
            return f"UNSTABLE (load {self.load:.2g} >= 1)"
        return f"{self.angle:.1f}° (|V|/|W| {self.norm_ratio:.3f})"


def noise_floor(
    fan_in: float,
    fan_out: float,
    samples: int,
    rate: float,
    momentum: float = 0.9,
    *,
    iterations: int = 1,
    average_decay: float | None = None,
    averaged_steps: int | None = None,
    tap_use: Sequence[float] = (1.0,),
) -> Floor:
    """The stationary angle between a feedback weight and W^T (docs/maths.md §7):

        tan^2(theta) = c (fan_in + fan_out) / S  /  (1 - c fan_out / S)  /  R

    with c = floor_constant(rate, momentum), rate = lr x curvature(noise_std, P), S = samples
    (batch x output positions, times the noise copies), and R = averaging_gain for a feedback
    weight averaged over steps of `iterations` iterations with `average_decay` (None: the raw
    V; 1: the plain mean) after `averaged_steps` steps (None: stationary). For a kernel whose
    taps read outside the input at some positions (`tap_use`: per tap, the fraction of
    positions where it reads inside; BlockShape.tap_use), each tap floors with rate and S
    scaled by its use, and the angle is that of the feedback the targets see, taps weighted
    by their use (docs/maths.md §7.1). Exact for a block with a linear feedback path (no
    folded activation or pool) when fan_in + fan_out << S / c."""
    for name, value in (("fan_in", fan_in), ("fan_out", fan_out)):
        if not (finite_real(value) and value > 0):
            raise ValueError(f"noise_floor: {name} must be a finite number > 0, got {value!r}")
    if not (finite_real(samples) and samples >= 1 and float(samples).is_integer()):
        raise ValueError(f"noise_floor: samples must be a whole number >= 1, got {samples!r}")
    if not (finite_real(rate) and rate >= 0):
        raise ValueError(f"noise_floor: rate must be a finite number >= 0, got {rate!r}")
    if not (finite_real(momentum) and 0 <= momentum < 1):
        raise ValueError(f"noise_floor: momentum must be in [0, 1), got {momentum!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, Integral) or iterations < 0:
        raise ValueError(f"noise_floor: iterations must be an int >= 0, got {iterations!r}")
    if average_decay is not None and not (finite_real(average_decay) and 0 <= average_decay <= 1):
        raise ValueError(
            f"noise_floor: average_decay must be None or in [0, 1], got {average_decay!r}"
        )
    if averaged_steps is not None and not (finite_real(averaged_steps) and averaged_steps >= 1):
        raise ValueError(
            f"noise_floor: averaged_steps must be None or a number >= 1, got {averaged_steps!r}"
        )
    # Plain floats from here on (numpy or other real numbers give the same floor, as floats).
    fan_in, fan_out, samples = float(fan_in), float(fan_out), float(samples)
    rate, momentum = float(rate), float(momentum)
    if finite_real(tap_use):
        tap_use = (tap_use,)  # one tap (or every tap) used this much
    try:
        uses = [float(u) for u in tap_use]
    except (TypeError, ValueError):
        uses = []
    if not uses or any(not (0 <= u <= 1) for u in uses) or not any(u > 0 for u in uses):
        raise ValueError(
            f"noise_floor: tap_use must be fractions in [0, 1], one at least > 0, got {tap_use!r}"
        )
    weighted, total, load = 0.0, 0.0, 0.0
    for use in uses:
        if use == 0:
            continue  # a tap that never reads the input is never used nor trained
        c = floor_constant(rate * use, momentum)
        tap_samples = samples * use
        tap_load = c * fan_out / tap_samples
        load = max(load, tap_load)
        if not tap_load < 1:
            continue
        tan2 = c * (fan_in + fan_out) / tap_samples / (1 - tap_load)
        weighted += use * tan2 / averaging_gain(c, iterations, average_decay, averaged_steps)
        total += use
    if not load < 1:
        return Floor(90.0, math.inf, False, load)
    tan2 = weighted / total
    return Floor(math.degrees(math.atan(math.sqrt(tan2))), math.sqrt(1 + tan2), True, load)


def iteration_contraction(rate: float, momentum: float) -> float:
    """Spectral radius of SGD with momentum on a quadratic, per iteration: how fast V forgets
    its start (sqrt(momentum) from the critical rate (1 - sqrt(momentum))^2 on)."""
    b = 1 + momentum - rate
    disc = b * b - 4 * momentum
    if disc < 0:
        return math.sqrt(momentum)
    return max(abs(b + math.sqrt(disc)), abs(b - math.sqrt(disc))) / 2


def transient_iterations(rate: float, momentum: float, efolds: float = TRANSIENT_EFOLDS) -> int:
    """Iterations after which V's initial error has shrunk by e^-efolds."""
    rho = iteration_contraction(rate, momentum)
    if rho >= 1:  # the iteration itself diverges (rate >= 2 (1 + momentum)): never settles
        return 10**9
    if rho <= 0:
        return 1
    return max(1, math.ceil(efolds / -math.log(rho)))


def fastest_rate(momentum: float) -> float:
    """The smallest rate at which V forgets its start at the best speed, sqrt(momentum) per
    iteration (critical damping)."""
    return (1 - math.sqrt(momentum)) ** 2


def _stable_rate(shape: BlockShape, momentum: float) -> float:
    """The rate at which c * fan_out / samples = STABILITY_LOAD (inverse of floor_constant)."""
    c = STABILITY_LOAD * shape.samples / shape.fan_out
    return 2 * c * (1 - momentum) * (1 + momentum) / (1 + momentum + c * (1 - momentum))


@dataclass(frozen=True)
class BlockPlan:
    """A block's feedback settings and what they are predicted to give."""

    name: str
    shape: BlockShape
    iterations: int  # per step, each on `copies` copies of the recorded batch
    noise_std: float
    lr: float
    rate: float  # lr x curvature
    momentum: float
    floor: Floor  # of V's mean over PLAN_AVERAGED_STEPS steps of a fixed W, or V's own
    raw_floor: Floor  # the raw V's
    cost: float  # multiply-adds per step (~4 block products per iteration)
    transient_steps: int  # steps the raw V needs to forget its random start
    warm_start_iterations: int  # iterations of the first step's warm start (0: none)
    warm_start_lr: float
    planned: tuple[str, ...]  # which of iterations / noise_std / lr were chosen here
    notes: tuple[str, ...] = field(default=())
    copies: int = 1  # noise copies: each iteration runs on this many copies of the batch
    capped: bool = False  # its planned iterations were lowered to fit the cost cap
    # Without a cost cap: the multiply-adds per step of the iterations it would plan on its
    # batch (the measure the cap is applied to), and whether their floor meets the target.
    uncapped_cost: float = 0.0
    uncapped_meets_target: bool = True

    @property
    def noise_per_step(self) -> float:
        """tan^2 of the raw V's floor over the averaging gain of one more step (each tap's own,
        with the noise copies): how much an average over n steps holds is noise_per_step / n
        (docs/maths.md §7.3)."""
        if not self.raw_floor.stable:
            return float("inf")
        many = 10**6  # a mean of `many` steps: its gain is many x one step's
        return math.tan(math.radians(self.averaged_floor(many).angle)) ** 2 * many

    def averaged_floor(self, steps: int) -> Floor:
        """The floor of V's plain mean over `steps` steps of a fixed W, each running this plan
        (its iterations, rate and noise copies; docs/maths.md §7.3)."""
        s = self.shape
        return noise_floor(
            s.fan_in,
            s.fan_out,
            with_copies(s, self.copies).samples,
            self.rate,
            self.momentum,
            iterations=self.iterations,
            average_decay=1.0,
            averaged_steps=steps,
            tap_use=s.tap_use,
        )

    @property
    def warm_start_cost(self) -> float:
        """Multiply-adds of its warm start (on the batch itself, at its first step)."""
        return self.warm_start_iterations * _iteration_cost(self.shape)

    def steps_to(self, angle: float) -> int | None:
        """The fewest steps of a fixed W after which V's plain mean is within `angle` degrees of
        W^T by the floor formula (docs/maths.md §7.3: its tan^2 falls as 1 / steps once they
        outlast V's decorrelation); None where it never is (an unstable floor, or no iterations
        and a floor above `angle`)."""
        if not (finite_real(angle) and 0 < angle < 90):
            raise ValueError(f"steps_to: angle must be in (0, 90) degrees, got {angle!r}")
        if not self.raw_floor.stable:
            return None

        def floor(steps):
            return self.averaged_floor(steps).angle

        lo, hi = 0, 1
        while floor(hi) > angle:  # with iterations, the angle falls as 1 / sqrt(steps)
            if self.iterations == 0 or hi > 2**62:
                return None
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # floor(lo) > angle >= floor(hi) (lo 0: one step already does)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if floor(mid) > angle else (lo, mid)
        return hi


def _iteration_cost(shape: BlockShape) -> float:
    # One iteration: F(x + eps), V u, and the two weight-gradient pairings, each ~ a forward
    # pass of the block (docs/maths.md §8).
    return 4.0 * shape.macs


def noise_copies(shape: BlockShape, iterations: int) -> tuple[int, int]:
    """(iterations', copies), each iteration on at most NOISE_COPY_ROWS rows (batch x positions x
    copies), that hold the most of `iterations` single-batch iterations' noise samples (never
    more; the most copies among the fullest), or (iterations, 1) where copies would hold less
    than COPIES_KEEP of them."""
    best = (0, 1)
    for copies in range(2, min(NOISE_COPY_ROWS // shape.samples, iterations) + 1):
        steps = iterations // copies
        if steps * copies >= best[0] * best[1]:
            best = (steps, copies)
    return best if best[0] * best[1] >= COPIES_KEEP * iterations else (iterations, 1)


def with_copies(shape: BlockShape, copies: int) -> BlockShape:
    """The shape of one iteration on `copies` copies of the batch."""
    if copies == 1:
        return shape
    return replace(shape, batch=shape.batch * copies, macs=shape.macs * copies)


def step_rate(momentum: float) -> float:
    """The planned rate x iterations of a step: STEP_RATE at momentum 0.9, scaled by
    (1 - momentum) / 0.1 elsewhere, which keeps the floor constant c ~ rate / (2 (1 - momentum))
    and V's contraction per step (below the critical rate): the same floors and transients at
    any momentum (docs/maths.md §8). Unscaled, momentum 0 got a tenth of the floor constant and
    ten times the transient, momentum 0.999 a hundred times the constant (unstable plans)."""
    return STEP_RATE * (1 - momentum) / (1 - 0.9)


def _rate_for(shape, iterations, noise_std, lr, momentum):
    if lr is not None:
        return lr * curvature(noise_std, shape.positions)
    return min(step_rate(momentum) / max(iterations, 1), _stable_rate(shape, momentum))


def _warm_rate(rate, copies, single, momentum):
    """The warm start's rate: the single-batch rate of the same floor (rate / copies) or, to
    forget V's random start faster, the critical rate; at most a tenth of a step's rate, whose
    floor the warm start reaches (at momentum 0.9 the critical rate, 0.0026, is below it; at
    momentum 0 the critical rate, 1, would leave V at a floor far above its plan's), and never
    unstable."""
    fast = min(fastest_rate(momentum), step_rate(momentum) / 10)
    return min(max(rate / copies, fast), _stable_rate(single, momentum))


def _predict(shape, iterations, rate, momentum, averaged_steps):
    """(raw V's floor, the floor of its plain mean over `averaged_steps` steps or, None, the
    raw floor again)."""
    raw = noise_floor(
        shape.fan_in, shape.fan_out, shape.samples, rate, momentum, tap_use=shape.tap_use
    )
    if averaged_steps is None:
        return raw, raw
    averaged = noise_floor(
        shape.fan_in,
        shape.fan_out,
        shape.samples,
        rate,
        momentum,
        iterations=iterations,
        average_decay=1.0,
        averaged_steps=averaged_steps,
        tap_use=shape.tap_use,
    )
    return raw, averaged


def _fewest_iterations(shape, noise_std, lr, momentum, averaged_steps, target):
    """(The fewest iterations (1..MAX_PLANNED_ITERATIONS) whose floor meets `target`, True), or
    (MAX_PLANNED_ITERATIONS, False) when none does."""
    for k in range(1, MAX_PLANNED_ITERATIONS + 1):
        rate = _rate_for(shape, k, noise_std, lr, momentum)
        _, floor = _predict(shape, k, rate, momentum, averaged_steps)
        if floor.stable and floor.angle <= target:
            return k, True
    return MAX_PLANNED_ITERATIONS, False


def _above(angle: float, target: float) -> str:
    """`angle` with the decimals (2 or more) that show it above `target` (4.003 reads 4.003,
    not 4.00)."""
    digits = 2
    while digits < 6 and round(angle, digits) <= target:
        digits += 1
    return f"{angle:.{digits}f}° > {target:g}°"


def plan_feedback(
    shapes: Sequence[tuple[str, BlockShape]],
    *,
    iterations: Sequence[int | None] | None = None,
    noise_std: Sequence[float | None] | None = None,
    lr: Sequence[float | None] | None = None,
    momentum: float = 0.9,
    target_angle: float = DEFAULT_TARGET_ANGLE,
    averaged_steps: int | None = PLAN_AVERAGED_STEPS,
    max_cost: float | None = DEFAULT_MAX_COST,
    backprop_macs: float | None = None,
    warm_start: bool = True,
    allow_copies: bool = False,
) -> list[BlockPlan]:
    """Per trained block (name, BlockShape), the feedback settings (docs/maths.md §8): a given
    value (an entry of `iterations` / `noise_std` / `lr` that is not None) is kept; the others
    are chosen so that the block's floor, with its feedback weight averaged over
    `averaged_steps` steps of a fixed W (None: not averaged), meets `target_angle` with the
    fewest iterations, at lr = step_rate(momentum) /
    (iterations x curvature) lowered where needed to keep the floor stable. Then, when the
    chosen iterations cost more than `max_cost` times a backprop step (`backprop_macs` x 3:
    forward, input and weight gradients), the planned iterations are lowered where a degree
    costs most and matters least (minimising the sum over blocks of tan^2 weighted by the
    blocks before each: its error reaches all of them), and those blocks are noted above
    target. `allow_copies`: a block whose iterations and lr are both planned runs them on
    noise copies of its batch where that is faster (`noise_copies`): for plans of a fixed W,
    since fewer iterations a step, each faster, forget V's past more slowly per step
    (docs/maths.md §8). `shapes` are in forward order."""
    n = len(shapes)
    iterations = list(iterations) if iterations is not None else [None] * n
    noise_std = list(noise_std) if noise_std is not None else [None] * n
    lr = list(lr) if lr is not None else [None] * n
    if not (isinstance(target_angle, (int, float)) and 0 < target_angle < 90):
        raise ValueError(f"target_angle must be in (0, 90) degrees, got {target_angle!r}")
    rows = []
    for (name, shape), k, given_sigma, rate_lr in zip(shapes, iterations, noise_std, lr):
        sigma = DEFAULT_NOISE_STD if given_sigma is None else given_sigma
        if rate_lr is None and sigma == 0:
            raise ValueError(
                f"block {name!r}: noise_std 0 leaves the planned lr undefined (it scales as "
                "1 / noise_std^2); give lr explicitly or a noise_std > 0"
            )
        k_need, meets = (
            (k, True)
            if k is not None
            else _fewest_iterations(shape, sigma, rate_lr, momentum, averaged_steps, target_angle)
        )
        rows.append([name, shape, k, sigma, rate_lr, k_need, given_sigma, meets])
    costs = [_iteration_cost(r[1]) for r in rows]
    chosen = [r[5] for r in rows]
    if max_cost is not None and backprop_macs:
        budget = max_cost * 3.0 * backprop_macs
        chosen = _fit_budget(rows, costs, budget, momentum, averaged_steps)
    plans = []
    for (name, shape, k, sigma, rate_lr, k_need, given_sigma, meets), k_final, iteration in zip(
        rows, chosen, costs
    ):
        single_iterations, copies = k_final, 1
        if allow_copies and k is None and rate_lr is None:  # given settings keep their meaning
            k_final, copies = noise_copies(shape, k_final)
        single = shape
        shape = with_copies(shape, copies)
        rate = _rate_for(shape, k_final, sigma, rate_lr, momentum)
        raw, floor = _predict(shape, k_final, rate, momentum, averaged_steps)
        cur = curvature(sigma, shape.positions)
        notes = []
        if not floor.stable:
            notes.append(
                f"unstable: c * fan_out / (B P) = {floor.load:.2g} >= 1 (fan_out {shape.fan_out:.4g}, "
                f"B*P {shape.samples}); lower its lr below "
                f"{_stable_rate(shape, momentum) / cur if cur else 0:.3g} or raise the batch"
            )
        elif floor.angle > target_angle:
            if single_iterations < k_need:
                why = "cost cap"
            elif k is not None:
                why = "settings"
            elif (
                copies > 1
                and _predict(
                    single,
                    single_iterations,
                    _rate_for(single, single_iterations, sigma, rate_lr, momentum),
                    momentum,
                    averaged_steps,
                )[1].angle
                <= target_angle
            ):
                # The copies hold at least COPIES_KEEP of the planned iterations' samples.
                why = f"noise copies: {k_final} x {copies} for {single_iterations} iterations"
            else:
                why = "iteration cap"
            # Decimals that show it: a floor of 4.03 is above a target of 4 but prints as 4.0
            # elsewhere.
            notes.append(f"above target ({why}: {_above(floor.angle, target_angle)})")
        if not shape.linear_feedback:
            notes.append("folded activation/pool: floor approximate")
        transient = math.ceil(transient_iterations(rate, momentum) / k_final) if k_final else 0
        # The warm start runs on the batch itself, at the single-batch rate of the same floor
        # (rate / copies) or faster (it only has to forget V's start).
        warm_rate = _warm_rate(rate, copies, single, momentum)
        # No warm start where no iterations were asked for (iterations=0: feedback left as is).
        warm_iterations = transient_iterations(warm_rate, momentum) if warm_start and k_final else 0
        plans.append(
            BlockPlan(
                name=name,
                shape=single,
                iterations=k_final,
                noise_std=sigma,
                lr=rate / cur if cur else (rate_lr or 0.0),
                rate=rate,
                momentum=momentum,
                floor=floor,
                raw_floor=raw,
                cost=k_final * _iteration_cost(shape),  # the copies' products included
                transient_steps=transient,
                warm_start_iterations=warm_iterations,
                warm_start_lr=warm_rate / cur if cur else 0.0,
                planned=tuple(
                    h
                    for h, given in (("iterations", k), ("noise_std", given_sigma), ("lr", rate_lr))
                    if given is None
                ),
                notes=tuple(notes),
                copies=copies,
                capped=single_iterations < k_need,
                uncapped_cost=k_need * iteration,
                uncapped_meets_target=meets,
            )
        )
    return plans


def _fit_budget(rows, costs, budget, momentum, averaged_steps):
    """Planned iterations lowered (given ones kept) until their cost fits `budget`: each
    planned block gets clip(lambda sqrt(a / cost), 1, needed) iterations, a its tan^2 x
    iterations (the floor falls as 1 / iterations under averaging), lambda the largest that
    fits (bisection); this minimises the sum of tan^2 for the budget."""
    need = [r[5] for r in rows]
    total = sum(k * c for k, c in zip(need, costs))
    if total <= budget:
        return need
    fixed = sum(k * c for r, k, c in zip(rows, need, costs) if r[2] is not None)
    weights = []
    for depth, ((_, shape, k, sigma, rate_lr, k_need, *_), cost) in enumerate(zip(rows, costs), 1):
        if k is not None:
            weights.append(None)
            continue
        rate = _rate_for(shape, k_need, sigma, rate_lr, momentum)
        _, floor = _predict(shape, k_need, rate, momentum, averaged_steps)
        tan2 = math.tan(math.radians(floor.angle)) ** 2 if floor.stable else 1.0
        # A block's error reaches every block before it in forward order (`depth` of them):
        # minimising sum(depth * tan^2) minimises the mean over blocks of their updates' tan^2.
        weights.append(math.sqrt(depth * tan2 * k_need / cost) if cost > 0 else 0.0)

    def fitted(lam):
        return [
            k_need if w is None else max(1, min(k_need, math.floor(lam * w)))
            for w, k_need in zip(weights, need)
        ]

    def spend(ks):
        return sum(k * c for k, c in zip(ks, costs))

    if spend(fitted(0.0)) > budget or fixed > budget:
        return fitted(0.0)  # even one iteration per planned block is over: the fewest
    lo, hi = 0.0, 1.0
    while spend(fitted(hi)) <= budget and hi < 1e30:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if spend(fitted(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return fitted(lo)


def describe_plan(plan: BlockPlan, warm_start_due: bool = True) -> str:
    """One line: what a block's settings are predicted to give (explain()'s second line);
    `warm_start_due`: whether its warm start is still to run (at its first step)."""
    s = plan.shape
    which = f"planned: {', '.join(plan.planned)}; " if plan.planned else ""
    if plan.copies > 1:
        which += f"each iteration on {plan.copies} noise copies of the batch; "
    warm = (
        f", warm start {plan.warm_start_iterations} it. at lr {plan.warm_start_lr:.3g}"
        + ("" if warm_start_due else " (run at its first step)")
        if plan.warm_start_iterations
        else ""
    )
    return (
        f"{which}fan_in {s.fan_in:.4g}, fan_out {s.fan_out:.4g}, B*P {s.batch}*{s.positions}; floor "
        f"{plan.floor.describe()}, raw V {plan.raw_floor.describe()}; settles in "
        f"~{plan.transient_steps} steps{warm}; cost {plan.cost / 1e6:.3g} M mult-adds/step"
    )
