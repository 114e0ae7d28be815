"""FeedbackTrainer: the L-DRL feedback phase (SPEC §2.2) for every trained block of a model."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Real

import torch
from torch import nn

from . import alignment, cuda_graphs, hardware, ops
from .averaging import FeedbackAverages
from .cuda_graphs import LoopGraphs
from .metrics import feedback_in_forward_shape
from .nn import DTPBlock, dtp_blocks, forward_clock

Number = int | float
# Bounds that keep every derived size finite and within the ops' 64-bit integers.
MAX_ITERATIONS = 10**9  # feedback iterations of one block in one step


@dataclass
class FeedbackReport:
    """What one FeedbackTrainer.step() did: per block, the loss of every iteration, the kernel
    that ran, and (`alignment()`) how its feedback weight stands against its predicted floor."""

    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)  # which compiled kernel ran, by block
    _final_losses: dict[str, float] | None = field(default=None, repr=False)
    # Per block: |V|^2, |W|^2, <V, W>, |A|^2, <A, W> (A the averaged V, else V) as one float64
    # tensor on the block's device, and the block's plan; read on demand by alignment().
    _quality: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
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
        - `status`: "ok", "settling" (raw angle more than 10 degrees above its floor) or
          "unstable" (predicted, or |V|/|W| more than twice the prediction).
        """
        if self._alignment is None:
            names = list(self._quality)
            values = (
                torch.stack([self._quality[n].to("cpu") for n in names]).tolist() if names else []
            )
            self._alignment = {}
            for name, (vv, ww, vw, aa, aw) in zip(names, values):
                plan = self._plans[name]
                raw_angle, raw_ratio = _angle_and_ratio(vv, ww, vw)
                angle, ratio = _angle_and_ratio(aa, ww, aw)
                floor = plan.raw_floor
                if not floor.stable or raw_ratio > 2 * floor.norm_ratio:
                    status = "unstable"
                elif raw_angle > floor.angle + 10:
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


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether every element of `t` is finite, a 0-dim bool tensor, in one pass with no
    temporary of t's size (its extremes are finite exactly when every element is)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    low, high = torch.aminmax(t)
    return torch.isfinite(low) & torch.isfinite(high)


_WARNED_BFLOAT16: set[str] = set()


def _warn_emulated_bfloat16(device: torch.device):
    """Once per device type and process: bfloat16 asked for where it is emulated (slower)."""
    if device.type in _WARNED_BFLOAT16:
        return
    _WARNED_BFLOAT16.add(device.type)
    missing = hardware.missing_bfloat16(device)
    if missing is not None:
        warnings.warn(
            f"FeedbackTrainer: bfloat16 feedback loops on {device.type} need {missing}; "
            "float32 (compute_dtype=None) is faster here "
            "(dtp_ext.hardware.preferred_compute_dtype picks for you)",
            RuntimeWarning,
            stacklevel=4,
        )


def _average_across_ranks(tensors, world: int):
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t)
        t.div_(world)


@torch.no_grad()
def feedback_bytes_per_iteration(block: DTPBlock, x: torch.Tensor) -> int:
    """Bytes one feedback iteration of `block` on input `x` holds while it is batched with
    others: what `memory_budget_mb` is divided by (docs/memory.md)."""
    # Shapes only: the block's forward on meta tensors (no computation, no data).
    meta = {"device": "meta", "dtype": block.weight.dtype}  # (x may be bfloat16)
    out, _ = block.forward_with_indices(
        torch.empty(x[:1].shape, **meta),
        torch.empty(block.weight.shape, **meta),
        None if block.bias is None else torch.empty(block.bias.shape, **meta),
    )
    pool_area = block.pool**2 if block.pool else 1
    # Per iteration and sample: eps and x + eps; the conv output and its activation (pool
    # input); the pooled output, eta and, with a pool, int64 indices.
    elements = 2 * x[0].numel() + 2 * out.numel() * pool_area + 2 * out.numel()
    return x.shape[0] * (elements * x.element_size() + (8 * out.numel() if block.pool else 0))


def chunk_iterations(block: DTPBlock, x: torch.Tensor, memory_budget_mb: float) -> int:
    """How many feedback iterations of `block` on input `x` may share one batched F(x + eps)
    within `memory_budget_mb` of extra memory (at least one)."""
    budget = memory_budget_mb * 2**20  # bytes; inf for a budget near float64's largest
    chunk = budget // feedback_bytes_per_iteration(block, x) if math.isfinite(budget) else math.inf
    # More iterations than a step can run is as good as unlimited.
    return max(1, int(min(chunk, MAX_ITERATIONS)))


SYNC_MODES = (None, "gradients", "weights", "none")


def _process_group_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _finite_real(value) -> bool:
    """A finite real number (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)


def check_per_block(name: str, value, *, integer: bool = False, owner: str = "FeedbackTrainer"):
    """A scalar or a list of per-block values: each finite, >= 0 (whole, and at most
    MAX_ITERATIONS, for iterations). The one check of per-block feedback settings (`dtp-ext
    train`'s config calls it too); errors start with `owner`."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    prefix = f"{owner}: " if owner else ""
    for v in values:
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{prefix}{name} entries must be finite numbers >= 0, got {v!r}")
        if integer and int(v) != v:
            raise ValueError(f"{prefix}{name} entries must be whole numbers, got {v!r}")
        if integer and v > MAX_ITERATIONS:
            raise ValueError(f"{prefix}{name} entries must be at most {MAX_ITERATIONS}, got {v!r}")
    cast = int if integer else float
    return [cast(v) for v in values] if isinstance(value, (list, tuple)) else cast(value)


HYPERPARAMETERS = ("iterations", "noise_std", "lr")


class FeedbackTrainer:
    """Trains the feedback weights of a model's DTP blocks with L-DRL.

    Which blocks: a block's feedback weights are trained exactly when its input needs a target
    (SPEC §10), read from the data flow of the latest training-mode forward pass with autograd
    on: its input required grad, i.e. something trainable produced it. A block fed only by the
    data (or by frozen modules) is skipped. The trained blocks run in forward execution order.
    Pass `blocks` (modules or their names) to choose them yourself, in the order given.
    `trainer.explain()` shows which blocks are trained, in which order, and why others are not.

    Settings: `FeedbackTrainer(model)` plans each block's `iterations` and `lr` itself, at the
    first `step()`, from the block's shape and batch (dtp_ext.alignment.plan_feedback,
    docs/maths.md §8): the fewest iterations whose predicted noise floor, with the feedback
    weight averaged over steps, is at most `target_angle` degrees from W^T, within `max_cost`
    times a backprop step's multiply-adds; noise_std defaults to 0.1. `iterations`,
    `noise_std` and `lr` given explicitly win: each is None (planned), a scalar or a list with
    one entry per trained block in forward order (in `blocks` order when given). Lists are
    bound to blocks by name the first time the trained blocks are known (at the first
    `step()`, or at construction if the model has already run a training forward pass).
    Settings predicted unstable are warned about once, naming the block and what to change.

    Averaging (`average_decay`, docs/maths.md §7.3): targets use each feedback weight
    averaged over steps: the plain mean while the forward weights stay put (a feedback-only
    warm-up), and once they move an average whose window follows their measured drift,
    capped at 1 / (1 - average_decay) steps (0: V itself; an average lags a moving W, which
    measurably hurt training). The loop trains V itself. "auto" (the default) averages with
    decay 0 when any setting is planned, and not at all when all three are given (the paper's
    semantics); None switches it off. `warm_start` ("auto": when
    any setting is planned) runs, at a block's first step, enough extra iterations for its
    random feedback weight to reach its floor before any target uses it.

    `step()` runs the fused K-iteration loop (one compiled call per block) on the input each
    block recorded during the latest training-mode forward pass. Noise comes from torch's
    default generator, so `torch.manual_seed` makes runs reproducible. `memory_budget_mb`
    bounds the extra memory used to batch F(x + eps) across iterations. `max_growth` is the
    divergence guard's bound on how many times a feedback weight's norm may grow in one step
    (None: no bound; non-finite values are always refused). On a GPU the blocks'
    loops run concurrently on their own CUDA streams (`concurrent_blocks=False` to serialise).

    Feedback warm-up: feedback weights start random, so the first targets are poor. The
    planned settings' warm start brings each block to its floor at its first step; a
    feedback-only warm-up (model(x); trainer.step(), no backward or optimizer step, for a few
    dozen batches; `dtp-ext train --feedback-only-steps N`) fills the averages before the
    forward weights move. The trainer warns once if forward weights were updated before their
    block's feedback was ever trained.

    Under torch.distributed (e.g. a DistributedDataParallel model), `sync` keeps the feedback
    weights identical on every rank: "gradients" (the default when a process group of more than
    one rank is initialised) averages the feedback gradients at every iteration, the same maths
    as one big batch (one all-reduce of the feedback weights and momentum per iteration);
    "weights" trains locally and averages the feedback weights and momentum once per step
    (one all-reduce per block and step); "none" leaves each rank alone.

    Mixed precision: `compute_dtype=torch.bfloat16` (or torch.float16) runs a float32 model's
    feedback loops in that dtype: the recorded input, forward weights and noise (drawn as the
    float32 stream, rounded) are cast, the products run in it with float32 accumulation, the
    elementwise passes and losses in float32, and the feedback weights and momentum stay
    float32 masters, updated in float32 every iteration so small steps are not lost to
    rounding. None (the default) computes in the recorded input's dtype: after a forward pass
    under torch.autocast that is the autocast dtype, again with float32 masters.

    `cuda_graphs=True` captures each CUDA block's whole feedback loop as a CUDA graph at its
    first step and replays it on later steps (one launch instead of ~13 per iteration; same
    results as the eager loop, noise included; see dtp_ext/cuda_graphs.py for what triggers a
    new capture and what the graphs keep in memory). Off by default: it has not yet been run on
    a GPU (its tests, tests/test_cuda_graphs.py, run in benchmarks/gpu_check.sh). Blocks on the
    CPU, explicit `noise` and sync="gradients" run eagerly; `report.kernels` says which ran.
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
    ):
        named = dtp_blocks(model)
        if not named:
            raise ValueError(
                "FeedbackTrainer: the model has no dtp_ext.Linear/Conv2d blocks; "
                "build it from dtp_ext layers or call dtp_ext.convert(model) first"
            )
        self._model_blocks = named
        self._chosen = None if blocks is None else self._select_blocks(named, blocks)
        self._spec = {}
        self._bound: list | None = None  # [(name, block)] the lists are bound to
        self._hyper: dict[str, tuple] = {}  # name -> (iterations, noise_std, lr)
        self.iterations = iterations
        self.noise_std = noise_std
        self.lr = lr
        if not (0 <= momentum < 1):
            raise ValueError(f"FeedbackTrainer: momentum must be in [0, 1), got {momentum!r}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(
                f"FeedbackTrainer: weight_decay must be finite and >= 0, got {weight_decay!r}"
            )
        if not (_finite_real(memory_budget_mb) and memory_budget_mb > 0):
            raise ValueError(
                f"FeedbackTrainer: memory_budget_mb must be a finite number > 0, got "
                f"{memory_budget_mb!r}"
            )
        if max_growth is not None and not (_finite_real(max_growth) and max_growth > 1):
            raise ValueError(
                f"FeedbackTrainer: max_growth must be None or a finite number > 1, got "
                f"{max_growth!r}"
            )
        self.max_growth = None if max_growth is None else float(max_growth)
        if not (_finite_real(target_angle) and 0 < target_angle < 90):
            raise ValueError(
                f"FeedbackTrainer: target_angle must be a number of degrees in (0, 90), got "
                f"{target_angle!r}"
            )
        self.target_angle = float(target_angle)
        if max_cost is not None and not (_finite_real(max_cost) and max_cost > 0):
            raise ValueError(
                f"FeedbackTrainer: max_cost must be None or a finite number > 0 (feedback "
                f"multiply-adds per step over a backprop step's), got {max_cost!r}"
            )
        self.max_cost = None if max_cost is None else float(max_cost)
        planning = any(self._spec[h] is None for h in HYPERPARAMETERS)
        if average_decay == "auto":
            average_decay = alignment.DEFAULT_AVERAGE_DECAY if planning else None
        if average_decay is not None and not (
            _finite_real(average_decay) and 0 <= average_decay < 1
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
        # Per block: its plan (settings and predicted floor; dtp_ext.alignment), the input
        # shape it was planned for, its successful steps, and its forward weight's version at
        # construction (whether W was updated before its feedback was ever trained) and at the
        # end of its latest step (whether W moved since).
        self._plans: dict[str, alignment.BlockPlan] = {}
        self._plan_key: dict[str, tuple] = {}
        self._forward_macs = 0  # every block's forward multiply-adds, at the plans' batch
        self._block_steps: dict[str, int] = {}
        self._warned: set[str] = set()  # blocks warned about as predicted unstable
        self._warned_untrained = False
        self._initial_versions = {n: self._weight_version(b) for n, b in named}
        # The forward clock at the latest step (at construction before any): blocks stamped
        # after it ran since; see _not_run_since_last_step.
        self._clock_at_step = forward_clock()
        self._stale: set[str] = set()
        self._last_trained: set[str] | None = None  # the blocks of the latest step
        self._weight_versions: dict[str, int] = {}  # at the end of each block's latest step
        if compute_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                f"FeedbackTrainer: compute_dtype must be None, torch.bfloat16 or "
                f"torch.float16, got {compute_dtype!r}"
            )
        # Mixed precision: the loops' products run in compute_dtype (None: the recorded
        # input's dtype, bfloat16 after an autocast forward, else the model's); the feedback
        # weights and momentum stay float32 masters, which the fused loop updates in float32.
        self.compute_dtype = compute_dtype
        if not isinstance(cuda_graphs, bool):
            raise ValueError(
                f"FeedbackTrainer: cuda_graphs must be True or False, got {cuda_graphs!r}"
            )
        # CUDA blocks' loops captured once and replayed (dtp_ext/cuda_graphs.py).
        self.cuda_graphs = cuda_graphs
        self._graphs = LoopGraphs()
        self._model = model
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.memory_budget_mb = float(memory_budget_mb)
        if sync not in SYNC_MODES:
            raise ValueError(f"FeedbackTrainer: sync must be one of {SYNC_MODES}, got {sync!r}")
        self.sync = sync
        self.concurrent_blocks = bool(concurrent_blocks)
        self._streams: dict[torch.device, list] = {}
        self._momentum_buffers: dict[str, dict[str, torch.Tensor]] = {}
        self.steps = 0
        if self._chosen is not None:
            self._bind(self._chosen)
        elif any(b.input_needs_target is not None for _, b in named):
            self._bind(self._data_flow_blocks())

    # -- hyperparameters: a scalar or one entry per trained block -----------------------
    def _set_hyperparameter(self, name, value):
        # None: planned per block at the first step (dtp_ext.alignment.plan_feedback).
        previous = self._spec.get(name, ...)
        self._spec[name] = (
            None if value is None else check_per_block(name, value, integer=name == "iterations")
        )
        if getattr(self, "_plans", None) and self._spec.get(name, ...) != previous:
            self._plans = {}  # planned again with the new value
        if self._bound is not None and len(self._spec) == len(HYPERPARAMETERS):
            self._bind(self._bound)

    iterations = property(
        lambda self: self._spec["iterations"],
        lambda self, v: self._set_hyperparameter("iterations", v),
    )
    noise_std = property(
        lambda self: self._spec["noise_std"],
        lambda self, v: self._set_hyperparameter("noise_std", v),
    )
    lr = property(lambda self: self._spec["lr"], lambda self, v: self._set_hyperparameter("lr", v))

    def _bind(self, blocks):
        """Assign every hyperparameter to `blocks` (forward order) by name."""
        per_block = []
        for name in HYPERPARAMETERS:
            value = self._spec[name]
            if isinstance(value, list):
                if len(value) != len(blocks):
                    raise ValueError(
                        f"FeedbackTrainer: {name} has {len(value)} entries, but {len(blocks)} DTP "
                        f"blocks are trained ({[n for n, _ in blocks]}, forward order; one entry "
                        "per block)"
                    )
                per_block.append(value)
            else:  # a scalar, or None: planned per block
                per_block.append([value] * len(blocks))
        self._bound = list(blocks)
        self._hyper = {n: values for (n, _), values in zip(blocks, zip(*per_block))}

    # -- which blocks ---------------------------------------------------------------------
    @staticmethod
    def _select_blocks(named, blocks):
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

    def _data_flow_blocks(self):
        """The blocks whose input needed a target in the latest training forward pass, in
        forward execution order."""
        needed = [(n, b) for n, b in self._model_blocks if b.input_needs_target]
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

    def _skip_reason(self, name, block) -> str | None:
        if name in self._stale:
            return (
                "it did not run in the latest training forward pass (a branch not taken): not "
                "trained on its older input"
            )
        if self._chosen is not None:
            return None if any(n == name for n, _ in self._chosen) else "not in blocks="
        if block.input_needs_target is None:
            return (
                "no training-mode forward pass with autograd on has run through it yet"
                if block.recorded_input is None or block.forward_stamp is None
                else "its training forward passes ran without autograd (torch.no_grad), so "
                "the data flow is unknown"
            )
        if not block.input_needs_target:
            return (
                "its input did not require grad in the latest training forward pass (it comes "
                "from the data or frozen modules only): no target is needed"
            )
        return None

    def _trained_now(self):
        """[(name, block, (iterations, noise_std, lr))] for this step, forward order."""
        if self._chosen is not None:
            blocks = self._chosen
        else:
            if all(b.input_needs_target is None for _, b in self._model_blocks):
                raise RuntimeError(
                    "FeedbackTrainer: no recorded forward pass with autograd on, so which blocks "
                    "need targets is unknown; run model(x) in training mode (model.train(), "
                    "outside torch.no_grad) before step(), or pass blocks="
                )
            blocks = self._data_flow_blocks()
            if self._bound is None:
                self._bind(blocks)
        self._stale = self._not_run_since_last_step(blocks)
        blocks = [(n, b) for n, b in blocks if n not in self._stale]
        unbound = [n for n, _ in blocks if n not in self._hyper]
        if unbound:
            if any(isinstance(self._spec[h], list) for h in HYPERPARAMETERS):
                raise RuntimeError(
                    f"FeedbackTrainer.step: blocks {unbound} now need targets, but the per-block "
                    f"lists were bound to {[n for n, _ in self._bound]} when the trained blocks "
                    "were first known; pass scalars, blocks=, or a new trainer"
                )
            self._hyper.update({n: tuple(self._spec[h] for h in HYPERPARAMETERS) for n in unbound})
        return [(n, b, self._hyper[n]) for n, b in blocks]

    def _planned(self, trained):
        """`trained` with each block's settings taken from its plan, made (dtp_ext.alignment)
        for the blocks' recorded inputs when missing or when a block's per-sample input shape
        changed; the batch a block was first planned for is kept."""
        keys = {}
        for name, block, _ in trained:
            x = block.recorded_input
            if x is None:
                return trained  # nothing to plan from yet (step() refuses it)
            old = self._plan_key.get(name)
            per_sample = tuple(x.shape[1:])
            keys[name] = (per_sample, old[1] if old and old[0] == per_sample else None)
        if any(k[1] is None for k in keys.values()) or any(n not in self._plans for n in keys):
            self._make_plans(trained, keys)
        return [(n, b, self._settings(n)) for n, b, _ in trained]

    def _settings(self, name):
        plan = self._plans[name]
        return plan.iterations, plan.noise_std, plan.lr

    def _make_plans(self, trained, keys):
        # A new input shape is planned for its batch: under torch.distributed the global one
        # (every rank's shard: the noise samples an averaged gradient holds), so that every
        # rank plans the same iterations (one all-reduce, when a shape is first seen).
        new = [n for n, _, _ in trained if keys[n][1] is None]
        if new:
            recorded = dict((n, b.recorded_input) for n, b, _ in trained)
            batches = torch.tensor([recorded[n].shape[0] for n in new], dtype=torch.int64)
            if _process_group_size() > 1:
                import torch.distributed as dist

                device = recorded[new[0]].device
                batches = batches.to(device)
                dist.all_reduce(batches)
            keys = dict(keys)
            keys.update({n: (keys[n][0], int(b)) for n, b in zip(new, batches.tolist())})

        def shape_of(block, batch):
            """The block's shape on its recorded input, for `batch` samples."""
            x = block.recorded_input
            shape = alignment.block_shape(block, x)
            return dataclasses.replace(shape, batch=batch, macs=shape.macs * batch // x.shape[0])

        shapes = [(n, shape_of(b, keys[n][1])) for n, b, _ in trained]
        # Every block's forward on the same batch (a backprop step is 3 of them); kept for
        # explain(), which compares the plans' cost with it.
        batch = shapes[0][1].batch
        self._forward_macs = sum(
            shape_of(b, batch).macs for _, b in self._model_blocks if b.recorded_input is not None
        )
        settings = [self._hyper[n] for n, _, _ in trained]
        plans = alignment.plan_feedback(
            shapes,
            iterations=[s[0] for s in settings],
            noise_std=[s[1] for s in settings],
            lr=[s[2] for s in settings],
            momentum=self.momentum,
            target_angle=self.target_angle,
            averaged_steps=None if self._averages is None else alignment.PLAN_AVERAGED_STEPS,
            max_cost=self.max_cost,
            backprop_macs=self._forward_macs,
            warm_start=self.warm_start,
        )
        for plan in plans:
            self._plans[plan.name] = plan
            self._plan_key[plan.name] = keys[plan.name]
            if not plan.raw_floor.stable and plan.name not in self._warned:
                self._warned.add(plan.name)
                warnings.warn(
                    f"FeedbackTrainer: block {plan.name!r}'s feedback settings are predicted "
                    f"{plan.notes[0]}; its feedback weight would grow step after step "
                    "(dtp_ext.alignment.noise_floor, docs/maths.md §7)",
                    RuntimeWarning,
                    stacklevel=4,
                )

    @property
    def plans(self) -> dict[str, alignment.BlockPlan]:
        """Each trained block's settings and predicted floor and cost (dtp_ext.alignment), by
        name; empty before the first step (or explain()) after a training forward pass."""
        return dict(self._plans)

    @property
    def blocks(self) -> list:
        """[(name, block)] trained at the next step, in forward order."""
        return [(n, b) for n, b, _ in self._trained_now()]

    def explain(self) -> str:
        """Which blocks step() trains, in which order and with which hyperparameters, each
        block's predicted noise floor and cost (flagging blocks predicted unstable or above
        `target_angle`), and why the model's other DTP blocks are skipped."""
        try:
            trained = self._trained_now()
        except RuntimeError as exc:
            return f"FeedbackTrainer: nothing to train yet: {exc}"
        if _process_group_size() == 1:  # planning may all-reduce: step() alone does it there
            trained = self._planned(trained)
        how = (
            "as chosen by blocks="
            if self._chosen is not None
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
                else f"a window of at most {1 / (1 - self._averages.decay):.3g} steps"
            )
            if self._averages is not None
            else "targets use the trained feedback weights themselves (no averaging)"
        )
        lines.append(
            f"  target floor {self.target_angle:g}° per block, cost cap "
            f"{'none' if self.max_cost is None else f'{self.max_cost:g}x a backprop step (multiply-adds)'}; "
            f"{averaging}"
        )
        total = 0.0
        for i, (name, block, (k, sigma, lr)) in enumerate(trained, 1):
            plan = self._plans.get(name)
            if plan is None:
                given = ", ".join(
                    f"{h} {'planned at the first step' if v is None else f'{v:g}'}"
                    for h, v in zip(HYPERPARAMETERS, (k, sigma, lr))
                )
                lines.append(f"  {i}. {name} ({type(block).__name__}): {given}")
                continue
            total += plan.cost
            flag = "  <-- " + "; ".join(plan.notes) if plan.notes else ""
            lines.append(
                f"  {i}. {name} ({type(block).__name__}): iterations {k}, noise_std {sigma:g}, "
                f"lr {lr:g}{flag}"
            )
            lines.append("       " + alignment.describe_plan(plan))
        if self._plans and trained:
            backprop = 3 * self._forward_macs
            lines.append(
                f"  predicted feedback cost: {total / 1e9:.3g} G mult-adds per step, "
                f"{total / backprop if backprop else 0:.2f}x a backprop step's"
            )
        trained_names = {n for n, _, _ in trained}
        skipped = [
            (n, self._skip_reason(n, b)) for n, b in self._model_blocks if n not in trained_names
        ]
        if skipped:
            lines.append("skipped:")
            lines += [f"  {n}: {why}" for n, why in skipped]
        return "\n".join(lines)

    def _buffers(self, name: str, block: DTPBlock) -> dict[str, torch.Tensor]:
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
        runs = []
        world = _process_group_size()
        sync = (self.sync or "gradients") if world > 1 else "none"
        trained = self._trained_now()
        parameters = {p.untyped_storage().data_ptr(): n for n, p in self._model.named_parameters()}
        for name, block, _ in trained:
            self._check_block(name, block, parameters)
        trained = self._planned(trained)
        self._warn_untrained_feedback(trained)
        try:
            for name, block, (k, sigma, lr) in trained:
                x = block.recorded_input
                buffers = self._buffers(name, block)
                noise_x, noise_y = (noise or {}).get(name, (None, None))
                warm = self._warm_start_pending(name)
                if warm and noise_x is not None:
                    raise ValueError(
                        f"FeedbackTrainer.step: block {name!r} is due its warm start "
                        f"({warm} extra iterations) but noise= gives only its {k} iterations' "
                        "noise; pass warm_start=False to the trainer to give all noise yourself"
                    )
                saved = (
                    block.feedback_weight.clone(),
                    block.feedback_bias.clone(),
                    buffers["weight"].clone(),
                    buffers["bias"].clone(),
                )
                run = [name, block, buffers, None, saved]
                runs.append(run)
                # Blocks share no state during the feedback phase: on a GPU each runs on its
                # own stream, so small blocks fill the device while large ones run.
                try:
                    with (
                        self._block_stream(x.device, len(runs) - 1)
                        if sync == "none"
                        else contextlib.nullcontext()
                    ):
                        warm_losses = (
                            self._train_block(
                                name,
                                block,
                                x,
                                buffers,
                                warm,
                                sigma,
                                self._plans[name].warm_start_lr,
                                None,
                                None,
                                sync,
                                world,
                            )[0]
                            if warm
                            else None
                        )
                        run[3], kernel = self._train_block(
                            name, block, x, buffers, k, sigma, lr, noise_x, noise_y, sync, world
                        )
                        if warm_losses is not None:
                            run[3] = torch.cat([warm_losses, run[3]])
                except ValueError as exc:  # the op refused a non-finite input before touching V
                    if not ops.is_non_finite_input_error(exc):
                        raise
                    raise FloatingPointError(
                        f"FeedbackTrainer.step: block {name!r} was not trained: {exc} (its recorded "
                        "input is not finite when the forward pass diverged); every block's feedback "
                        "weights and momentum were restored to their values before this step"
                    ) from exc
                report.losses[name] = run[3]
                report.kernels[name] = kernel
            self._join_streams(runs)
            report._final_losses = self._refuse_divergence(runs)
        except BaseException:
            self._join_streams(runs)
            self._restore(runs)
            raise
        self.steps += 1
        self._clock_at_step = forward_clock()
        self._last_trained = {n for n, _, _ in trained}
        for name, block, _ in trained:
            self._after_block_step(name, block, report)
        return report

    # -- warm start, averaging, feedback quality (docs/maths.md §7-§8) ---------------------
    @staticmethod
    def _weight_version(block) -> int:
        return block.weight._version

    def _warm_start_pending(self, name) -> int:
        """Extra iterations a block runs before this step's: its warm start, at its first step."""
        if not self.warm_start or self._block_steps.get(name, 0):
            return 0
        return self._plans[name].warm_start_iterations

    def _warn_untrained_feedback(self, trained):
        """Warn once when a block's forward weights were updated before its feedback weights
        were ever trained: those updates used a random feedback weight's targets."""
        for name, block, _ in trained:
            if self._block_steps.get(name, 0) or self._warned_untrained:
                continue
            if self._weight_version(block) != self._initial_versions.get(name):
                self._warned_untrained = True
                warnings.warn(
                    f"FeedbackTrainer: the forward weights of block {name!r} were updated before "
                    "its feedback weights were trained: those updates followed targets from a "
                    "random feedback weight (angles near 90° to backprop). Call trainer.step() "
                    "between model(x) and loss.backward(), or train the feedback alone first "
                    "(model(x); trainer.step() for a few batches, no optimizer step)",
                    RuntimeWarning,
                    stacklevel=3,
                )

    @torch.no_grad()
    def _after_block_step(self, name, block, report):
        """A successful step's bookkeeping for one block: its step count, its average (after
        the burn-in: none after a warm start, else its transient), its feedback quality."""
        steps = self._block_steps[name] = self._block_steps.get(name, 0) + 1
        plan = self._plans[name]
        version = self._weight_version(block)
        moved = self._weight_versions.get(name, version) != version
        self._weight_versions[name] = version
        burn_in = 0 if self.warm_start else plan.transient_steps
        if self._averages is not None and steps > burn_in:
            self._averages.update(name, block, plan.noise_per_step, moved)
        # Dot products in the feedback weight's own dtype (no float64 copies: for a wide layer
        # those cost as much as its feedback iterations); <A, .> only where A is not V.
        v = feedback_in_forward_shape(block, block.feedback_weight).reshape(-1)
        w = block.weight.detach().reshape(-1).to(v.dtype)
        vv, ww, vw = torch.dot(v, v), torch.dot(w, w), torch.dot(v, w)
        a = block.feedback_weight_average
        if a is None:
            aa, aw = vv, vw
        else:
            a = feedback_in_forward_shape(block, a).reshape(-1)
            aa, aw = torch.dot(a, a), torch.dot(a, w)
        report._quality[name] = torch.stack([vv, ww, vw, aa, aw]).double()
        report._plans[name] = plan

    def _check_block(self, name, block, parameters):
        """What the kernels cannot see: a stale or empty recorded input, feedback buffers that
        alias a forward parameter of the model."""
        x = block.recorded_input
        if x is None:
            raise RuntimeError(
                f"FeedbackTrainer.step: block {name!r} has no recorded forward pass; "
                "run model(x) in training mode (model.train()) before step()"
            )
        if x.shape[0] == 0:
            raise ValueError(
                f"FeedbackTrainer.step: block {name!r} recorded an empty batch (input "
                f"shape {tuple(x.shape)}): there is nothing to train its feedback on; "
                "skip step() for empty batches"
            )
        w = block.weight
        autocast_input = x.dtype in (torch.bfloat16, torch.float16) and w.dtype == torch.float32
        if (x.dtype != w.dtype and not autocast_input) or x.device != w.device:
            raise RuntimeError(
                f"FeedbackTrainer.step: block {name!r} recorded its input as {x.dtype} on {x.device}, "
                f"but its weights are now {w.dtype} on {w.device} (the model was cast or moved "
                "after its forward pass); run a training forward pass again before step()"
            )
        for buffer in ("feedback_weight", "feedback_bias"):
            shared = parameters.get(getattr(block, buffer).untyped_storage().data_ptr())
            if shared is not None:
                raise ValueError(
                    f"FeedbackTrainer: block {name!r}'s {buffer} shares memory with the model's "
                    f"parameter {shared!r}; the feedback loop writes it in place and would overwrite "
                    f"that parameter (give the buffer its own storage, e.g. .clone())"
                )

    def _compute_dtype(self, block, x) -> torch.dtype:
        dtype = x.dtype
        if self.compute_dtype is not None and block.weight.dtype == torch.float32:
            dtype = self.compute_dtype
        if dtype == torch.bfloat16:
            _warn_emulated_bfloat16(x.device)
        return dtype

    def _train_block(self, name, block, x, buffers, k, sigma, lr, noise_x, noise_y, sync, world):
        """The block's losses for this step and the kernel that computed them."""
        state = (block.feedback_weight, block.feedback_bias, buffers["weight"], buffers["bias"])
        weight, bias = block.weight, block.bias
        dtype = self._compute_dtype(block, x)
        if dtype != weight.dtype:  # mixed precision: products in dtype, float32 masters
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            noise_x = None if noise_x is None else noise_x.to(dtype)
            noise_y = None if noise_y is None else noise_y.to(dtype)

        def loop(iterations, nx, ny, chunk, inputs=(x, weight, bias)):
            return ops.ldrl_feedback_loop(
                *inputs,
                *state,
                iterations,
                sigma,
                lr,
                self.momentum,
                self.weight_decay,
                chunk,
                block.geometry(),
                nx,
                ny,
            )

        if sync == "gradients":
            # The SGD-momentum update is affine in the gradient, so averaging weights and
            # momentum after every single step from identical states equals stepping with the
            # averaged gradient.
            losses = []
            for i in range(k):
                losses.append(
                    loop(
                        1,
                        None if noise_x is None else noise_x[i : i + 1],
                        None if noise_y is None else noise_y[i : i + 1],
                        1,
                    )
                )
                _average_across_ranks(state + (losses[-1],), world)
            return (torch.cat(losses) if losses else x.new_empty(0)), ops.last_kernel()
        chunk = min(max(k, 1), self.chunk_iterations(block, x))
        if self.cuda_graphs and k > 0 and cuda_graphs.applies(x, noise_x, noise_y):
            settings = (k, sigma, lr, self.momentum, self.weight_decay, chunk, block.geometry())
            losses, kernel = self._graphs.run(
                name,
                (x, weight, bias),
                state,
                settings,
                lambda inputs: loop(k, None, None, chunk, inputs),
            )
        else:
            losses, kernel = loop(k, noise_x, noise_y, chunk), ops.last_kernel()
        if sync == "weights":
            _average_across_ranks(state + (losses,), world)
        return losses, kernel

    def _block_stream(self, device: torch.device, index: int):
        if device.type != "cuda" or not self.concurrent_blocks:
            return contextlib.nullcontext()
        streams = self._streams.setdefault(device, [])
        while len(streams) <= index:
            streams.append(torch.cuda.Stream(device))
        streams[index].wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.stream(streams[index])

    def _join_streams(self, runs):
        for device, streams in self._streams.items():
            main = torch.cuda.current_stream(device)
            for stream in streams:
                main.wait_stream(stream)
            for _, _, _, losses, _ in runs:
                if losses is not None and losses.device == device:
                    losses.record_stream(main)

    @staticmethod
    def _restore(runs):
        for _, b, buffers, _, saved in runs:
            for target, value in zip(
                (b.feedback_weight, b.feedback_bias, buffers["weight"], buffers["bias"]), saved
            ):
                target.copy_(value)

    def _refuse_divergence(self, runs):
        """Divergence guard: a step in which any block produced a non-finite loss or weight, or
        feedback weights that grew more than `max_growth` times (relative to the larger of their
        norm before the step and the forward weight's), is reported with the block (and the
        iteration), never kept; the caller restores every block. One device synchronisation per
        step."""
        if not runs:
            return {}
        checks, devices = [], []
        for _, block, _, losses, saved in runs:
            finite = (
                _all_finite(losses)
                & _all_finite(block.feedback_weight)
                & _all_finite(block.feedback_bias)
            )
            reference = torch.maximum(saved[0].norm(), block.weight.detach().norm())
            growth = block.feedback_weight.norm() / reference
            last = losses[-1] if losses.numel() else growth.new_zeros(())
            # One device and dtype for the single read (a model may span devices).
            checks.append(
                torch.stack([finite.to(growth.dtype), growth, last.to(growth.dtype)]).to(
                    device=runs[0][3].device, dtype=torch.float64
                )
            )
            if losses.device not in devices:
                devices.append(losses.device)
        # Deferred finite checks (CUDA): the flags the ops set since the last step.
        flags = [(d, ops.pending_non_finite(d)) for d in devices]
        flags = [(d, f) for d, f in flags if f is not None]
        values = torch.cat(
            [torch.stack(checks).flatten()]
            + [f.to(device=runs[0][3].device, dtype=torch.float64).reshape(1) for _, f in flags]
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
        for (name, block, _, losses, saved), (finite, growth, _) in zip(runs, values):
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
            if self.max_growth is not None and not growth <= self.max_growth:
                raise FloatingPointError(
                    f"FeedbackTrainer.step: block {name!r} diverged: its feedback weight's norm grew "
                    f"{growth:.3g} times in one step (from {float(saved[0].norm()):.3g} to "
                    f"{float(block.feedback_weight.norm()):.3g}, more than max_growth={self.max_growth:g} "
                    f"times the larger of that and its forward weight's norm); every block's feedback "
                    "weights and momentum were restored to their values before this step (lower its "
                    "feedback lr or noise_std, or warm the feedback up first)"
                )
        return {run[0]: last for run, (_, _, last) in zip(runs, values) if run[3].numel()}

    def state_dict(self) -> dict:
        """Momentum buffers, step count, the blocks the per-block lists are bound to (forward
        order; empty before the trained blocks are known), each block's steps, the input shape
        its plan was made for, and the feedback averages: a resumed trainer continues
        bitwise."""
        return {
            "steps": self.steps,
            "momentum_buffers": {
                n: {k: v.clone() for k, v in b.items()} for n, b in self._momentum_buffers.items()
            },
            "blocks": [n for n, _ in self._bound or []],
            "block_steps": dict(self._block_steps),
            "planned_for": {n: [list(k[0]), k[1]] for n, k in self._plan_key.items()},
            "averages": None if self._averages is None else self._averages.state_dict(),
            # Whether each block's forward weight moved since its latest step (the next step
            # treats its average accordingly; docs/maths.md §7.3).
            "forward_moved": {
                n: self._weight_version(b) != self._weight_versions[n]
                for n, b in self._model_blocks
                if n in self._weight_versions
            },
        }

    def load_state_dict(self, state: dict):
        if not isinstance(state, dict) or "momentum_buffers" not in state:
            raise ValueError(
                "FeedbackTrainer.load_state_dict: expected a dict from FeedbackTrainer.state_dict()"
            )
        saved = list(state.get("blocks") or [])
        by_name = dict(self._model_blocks)
        if self._bound is None and all(n in by_name for n in saved):
            if saved:  # a trainer that has not seen a forward pass takes the saved binding
                self._bind([(n, by_name[n]) for n in saved])
        elif saved != [n for n, _ in self._bound or []]:
            raise ValueError(
                f"FeedbackTrainer.load_state_dict: state is for blocks {saved}, this "
                f"trainer trains {[n for n, _ in self._bound or []]} (forward order)"
            )
        blocks = dict(self._bound or [])
        for name, buffers in state["momentum_buffers"].items():
            block = blocks[name]
            if buffers["weight"].shape != block.feedback_weight.shape:
                raise ValueError(
                    f"FeedbackTrainer.load_state_dict: momentum buffer of {name!r} has shape "
                    f"{tuple(buffers['weight'].shape)}, expected {tuple(block.feedback_weight.shape)}"
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
        self.steps = int(state.get("steps", 0))
        self._block_steps = {n: int(v) for n, v in (state.get("block_steps") or {}).items()}
        self._plan_key = {
            n: (tuple(shape), int(batch))
            for n, (shape, batch) in (state.get("planned_for") or {}).items()
        }
        self._plans = {}  # made again, for the saved input shapes, at the next step
        # Versions start afresh; a block whose W had moved since its latest step when the
        # state was saved counts as moved at its next step (-1: no version matches).
        moved = state.get("forward_moved") or {}
        self._weight_versions = {
            n: -1 if moved[n] else self._weight_version(b)
            for n, b in self._model_blocks
            if n in moved
        }
