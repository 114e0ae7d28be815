"""FeedbackTrainer: the L-DRL feedback phase (SPEC §2.2) for every trained block of a model."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from . import ops
from .nn import DTPBlock, dtp_blocks

Number = Union[int, float]


@dataclass
class FeedbackReport:
    """What one FeedbackTrainer.step() did: per block, the loss of every iteration."""

    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    kernels: Dict[str, str] = field(default_factory=dict)  # which compiled kernel ran, by block

    def final_losses(self) -> Dict[str, float]:
        return {name: float(l[-1]) for name, l in self.losses.items() if l.numel()}


def _average_across_ranks(tensors, world: int):
    import torch.distributed as dist
    for t in tensors:
        dist.all_reduce(t)
        t.div_(world)


@torch.no_grad()
def feedback_bytes_per_iteration(block: DTPBlock, x: torch.Tensor) -> int:
    """Bytes one feedback iteration of `block` on input `x` holds while it is batched with
    others: what `memory_budget_mb` is divided by (docs/memory.md)."""
    out, _ = block._forward_with_indices(x[:1], block.weight, block.bias)
    pool_area = block.pool ** 2 if block.pool else 1
    # Per iteration and sample: eps and x + eps; the conv output and its activation (pool
    # input); the pooled output, eta and, with a pool, int64 indices.
    elements = 2 * x[0].numel() + 2 * out.numel() * pool_area + 2 * out.numel()
    return x.shape[0] * (elements * x.element_size() + (8 * out.numel() if block.pool else 0))


def chunk_iterations(block: DTPBlock, x: torch.Tensor, memory_budget_mb: float) -> int:
    """How many feedback iterations of `block` on input `x` may share one batched F(x + eps)
    within `memory_budget_mb` of extra memory (at least one)."""
    return max(1, int(memory_budget_mb * 2**20 // feedback_bytes_per_iteration(block, x)))


SYNC_MODES = (None, "gradients", "weights", "none")


def _process_group_size() -> int:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _per_block(name: str, value, count: int, *, integer: bool = False) -> List:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"FeedbackTrainer: {name} has {len(values)} entries, but the model has "
                         f"{count} trained DTP blocks (one entry per block, forward order)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or v < 0:
            raise ValueError(f"FeedbackTrainer: {name} entries must be finite numbers >= 0, got {v!r}")
        if integer and int(v) != v:
            raise ValueError(f"FeedbackTrainer: {name} entries must be whole numbers, got {v!r}")
    return [int(v) for v in values] if integer else [float(v) for v in values]


class FeedbackTrainer:
    """Trains the feedback weights of a model's DTP blocks with L-DRL.

    `iterations`, `noise_std` and `lr` are each a scalar or a list with one entry per trained
    block, in forward order. By default the trained blocks are every DTP block of the model in
    registration order except the first, whose input (the data) needs no target; pass `blocks`
    (modules or their names, forward order) to choose them yourself.

    `step()` runs the fused K-iteration loop (one compiled call per block) on the input each
    block recorded during the latest training-mode forward pass. Noise comes from torch's
    default generator, so `torch.manual_seed` makes runs reproducible. `memory_budget_mb`
    bounds the extra memory used to batch F(x + eps) across iterations. On a GPU the blocks'
    loops run concurrently on their own CUDA streams (`concurrent_blocks=False` to serialise).

    Under torch.distributed (e.g. a DistributedDataParallel model), `sync` keeps the feedback
    weights identical on every rank: "gradients" (the default when a process group of more than
    one rank is initialised) averages the feedback gradients at every iteration, the same maths
    as one big batch (one all-reduce of the feedback weights and momentum per iteration);
    "weights" trains locally and averages the feedback weights and momentum once per step
    (one all-reduce per block and step); "none" leaves each rank alone.
    """

    def __init__(self, model: nn.Module, iterations, noise_std, lr, momentum: float = 0.9,
                 weight_decay: float = 0.0, *, blocks: Optional[Sequence] = None,
                 memory_budget_mb: float = 256.0, concurrent_blocks: bool = True,
                 sync: Optional[str] = None):
        named = dtp_blocks(model)
        if not named:
            raise ValueError("FeedbackTrainer: the model has no dtp_ext.Linear/Conv2d blocks; "
                             "build it from dtp_ext layers or call dtp_ext.convert(model) first")
        self.blocks = self._select_blocks(named, blocks)
        count = len(self.blocks)
        self.iterations = _per_block("iterations", iterations, count, integer=True)
        self.noise_std = _per_block("noise_std", noise_std, count)
        self.lr = _per_block("lr", lr, count)
        if not (0 <= momentum < 1):
            raise ValueError(f"FeedbackTrainer: momentum must be in [0, 1), got {momentum!r}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"FeedbackTrainer: weight_decay must be finite and >= 0, got {weight_decay!r}")
        if not (memory_budget_mb > 0):
            raise ValueError(f"FeedbackTrainer: memory_budget_mb must be > 0, got {memory_budget_mb!r}")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.memory_budget_mb = float(memory_budget_mb)
        if sync not in SYNC_MODES:
            raise ValueError(f"FeedbackTrainer: sync must be one of {SYNC_MODES}, got {sync!r}")
        self.sync = sync
        self.concurrent_blocks = bool(concurrent_blocks)
        self._streams: Dict[torch.device, list] = {}
        self._momentum_buffers: Dict[str, Dict[str, torch.Tensor]] = {}
        self.steps = 0

    @staticmethod
    def _select_blocks(named, blocks):
        if blocks is None:
            return named[1:]
        by_name = dict(named)
        by_module = {id(m): n for n, m in named}
        chosen = []
        for b in blocks:
            if isinstance(b, str):
                if b not in by_name:
                    raise ValueError(f"FeedbackTrainer: blocks names {b!r}, which is not a DTP block "
                                     f"of the model (those are {list(by_name)})")
                chosen.append((b, by_name[b]))
            elif id(b) in by_module:
                chosen.append((by_module[id(b)], b))
            else:
                raise ValueError("FeedbackTrainer: blocks must hold DTP blocks of the model or their names")
        return chosen

    def _buffers(self, name: str, block: DTPBlock) -> Dict[str, torch.Tensor]:
        buffers = self._momentum_buffers.get(name)
        fw = block.feedback_weight
        if buffers is None:
            buffers = {"weight": torch.zeros_like(fw), "bias": torch.zeros_like(block.feedback_bias)}
        elif buffers["weight"].device != fw.device or buffers["weight"].dtype != fw.dtype:
            buffers = {k: v.to(device=fw.device, dtype=fw.dtype) for k, v in buffers.items()}
        self._momentum_buffers[name] = buffers
        return buffers

    def chunk_iterations(self, block: DTPBlock, x: torch.Tensor) -> int:
        """How many iterations share one batched F(x + eps) under the memory budget."""
        return chunk_iterations(block, x, self.memory_budget_mb)

    @torch.no_grad()
    def step(self, *, noise: Optional[Dict[str, tuple]] = None) -> FeedbackReport:
        """Run the feedback iterations of every trained block; returns the per-iteration losses.

        `noise` (research and tests) maps a block name to explicit (noise_x, noise_y) tensors of
        shapes [K, *x.shape] and [K, *output.shape], already scaled.
        """
        report = FeedbackReport()
        runs = []
        world = _process_group_size()
        sync = (self.sync or "gradients") if world > 1 else "none"
        for (name, block), k, sigma, lr in zip(self.blocks, self.iterations, self.noise_std, self.lr):
            x = block.recorded_input
            if x is None:
                raise RuntimeError(f"FeedbackTrainer.step: block {name!r} has no recorded forward pass; "
                                   "run model(x) in training mode (model.train()) before step()")
            buffers = self._buffers(name, block)
            noise_x, noise_y = (noise or {}).get(name, (None, None))
            saved = (block.feedback_weight.clone(), block.feedback_bias.clone(),
                     buffers["weight"].clone(), buffers["bias"].clone())
            # Blocks share no state during the feedback phase: on a GPU each runs on its own
            # stream, so small blocks fill the device while large ones run.
            try:
                with self._block_stream(x.device, len(runs)) if sync == "none" else contextlib.nullcontext():
                    losses = self._train_block(block, x, buffers, k, sigma, lr, noise_x, noise_y,
                                               sync, world)
            except ValueError as exc:  # the op refused a non-finite input before touching V
                if not ops.is_non_finite_input_error(exc):
                    raise
                self._join_streams(runs)
                self._restore(runs)
                raise FloatingPointError(
                    f"FeedbackTrainer.step: block {name!r} was not trained: {exc} (its recorded "
                    "input is not finite when the forward pass diverged); every block's feedback "
                    "weights and momentum were restored to their values before this step") from exc
            runs.append((name, block, buffers, losses, saved))
            report.losses[name] = losses
            report.kernels[name] = f"dtp_ext::ldrl_feedback_loop[{x.device.type}]"
        self._join_streams(runs)
        self._refuse_non_finite(runs)
        self.steps += 1
        return report

    def _train_block(self, block, x, buffers, k, sigma, lr, noise_x, noise_y, sync, world):
        state = (block.feedback_weight, block.feedback_bias, buffers["weight"], buffers["bias"])

        def loop(iterations, nx, ny, chunk):
            return ops.ldrl_feedback_loop(x, block.weight, block.bias, *state, iterations, sigma,
                                          lr, self.momentum, self.weight_decay, chunk,
                                          block.geometry(), nx, ny)

        if sync == "gradients":
            # The SGD-momentum update is affine in the gradient, so averaging weights and
            # momentum after every single step from identical states equals stepping with the
            # averaged gradient.
            losses = []
            for i in range(k):
                losses.append(loop(1, None if noise_x is None else noise_x[i:i + 1],
                                   None if noise_y is None else noise_y[i:i + 1], 1))
                _average_across_ranks(state + (losses[-1],), world)
            return torch.cat(losses) if losses else x.new_empty(0)
        losses = loop(k, noise_x, noise_y, self.chunk_iterations(block, x))
        if sync == "weights":
            _average_across_ranks(state + (losses,), world)
        return losses

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
                if losses.device == device:
                    losses.record_stream(main)

    @staticmethod
    def _restore(runs):
        for _, b, buffers, _, saved in runs:
            for target, value in zip((b.feedback_weight, b.feedback_bias,
                                      buffers["weight"], buffers["bias"]), saved):
                target.copy_(value)

    @staticmethod
    def _refuse_non_finite(runs):
        """Divergence guard: a step in which any block produced a non-finite loss or weight is
        undone (every block's previous feedback weights and momentum are restored) and reported
        with the block and iteration, never kept. One device synchronisation per step."""
        if not runs:
            return
        finite = torch.stack([torch.isfinite(losses).all() & torch.isfinite(block.feedback_weight).all()
                              & torch.isfinite(block.feedback_bias).all()
                              for _, block, _, losses, _ in runs]).tolist()  # the one sync
        if all(finite):
            return
        name, block, _, losses, _ = runs[finite.index(False)]
        bad = (~torch.isfinite(losses)).nonzero()
        where = f"iteration {int(bad[0])}" if bad.numel() else "its final update"
        FeedbackTrainer._restore(runs)
        hint = ("its recorded input is not finite" if not torch.isfinite(block.recorded_input).all()
                else "lower its feedback lr or noise_std")
        raise FloatingPointError(
            f"FeedbackTrainer.step: block {name!r} diverged (non-finite loss or weights at {where}); "
            f"every block's feedback weights and momentum were restored to their values before "
            f"this step ({hint})")

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "momentum_buffers": {n: {k: v.clone() for k, v in b.items()}
                                 for n, b in self._momentum_buffers.items()},
            "blocks": [n for n, _ in self.blocks],
        }

    def load_state_dict(self, state: dict):
        names = [n for n, _ in self.blocks]
        if not isinstance(state, dict) or "momentum_buffers" not in state:
            raise ValueError("FeedbackTrainer.load_state_dict: expected a dict from FeedbackTrainer.state_dict()")
        if state.get("blocks") != names:
            raise ValueError(f"FeedbackTrainer.load_state_dict: state is for blocks {state.get('blocks')}, "
                             f"this trainer trains {names}")
        blocks = dict(self.blocks)
        self._momentum_buffers = {}
        for name, buffers in state["momentum_buffers"].items():
            block = blocks[name]
            if buffers["weight"].shape != block.feedback_weight.shape:
                raise ValueError(f"FeedbackTrainer.load_state_dict: momentum buffer of {name!r} has shape "
                                 f"{tuple(buffers['weight'].shape)}, expected {tuple(block.feedback_weight.shape)}")
            self._momentum_buffers[name] = {
                k: v.to(device=block.feedback_weight.device, dtype=block.feedback_weight.dtype).clone()
                for k, v in buffers.items()}
        self.steps = int(state.get("steps", 0))
