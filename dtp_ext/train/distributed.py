"""`dtp-ext train` under several processes (torchrun): the process group, what each rank owns,
and the collectives the training loop needs.

    torchrun --nproc_per_node 4 -m dtp_ext.train --device cuda ...

What is synchronised, per optimizer step:
- forward gradients: one all-reduce of every parameter's gradient, weighted by the rank's
  share of the global batch (so the result is the gradient of the global batch), in the same
  buffer as the step's loss/accuracy sums and a non-finite flag (every rank agrees to refuse a
  step). Not DistributedDataParallel: tp and drl write .grad from layer-local losses with
  torch.autograd.grad, and bp/tp/drl evaluate the blocks through chain.py instead of the
  module's forward, so DDP's reducer would see only ldrl's and dtp's gradients;
- feedback weights: ldrl through FeedbackTrainer(sync=--feedback-sync): "gradients" averages the
  feedback gradient of every iteration (one process on the global batch, up to the noise; 4
  all-reduces of a block's feedback weights and momentum per iteration) or "weights" averages
  weights and momentum once per step. dtp, tp and drl train feedback with their own SGD: their
  feedback weights (DRL: Q) and momentum are averaged once, right after each feedback phase
  (`average_after_feedback`), so the targets of the step already use the averaged weights;
- nothing else: model init is the same seed on every rank (and broadcast from rank 0), batch
  order and augmentation are functions of (seed, epoch, step), evaluation is sharded and summed.
Feedback noise differs per rank (rank 0 keeps the single-process stream, rank r > 0 reseeds
with `rank_seed`), as the images of one big batch would get independent noise.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .batches import mix_seed
from .config import ConfigError


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _local_rank() -> int:
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return dist.get_rank() % max(torch.cuda.device_count(), 1)


def rank_and_world():
    """(rank, world size) of this process: from the process group, else from torchrun's env."""
    if _initialized():
        return dist.get_rank(), dist.get_world_size()
    world = launched_world_size()
    return (int(os.environ.get("RANK", "0")) if world > 1 else 0), world


def init_from_env(device: str) -> bool:
    """Under torchrun (WORLD_SIZE > 1) with no process group yet, create the default one from
    the torchrun environment: nccl for a cuda device (each rank on cuda:LOCAL_RANK), gloo on
    the CPU. True if this call created it (then `shutdown` destroys it)."""
    if launched_world_size() <= 1 or _initialized():
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True


def shutdown():
    if _initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int, *salt: int) -> int:
    return mix_seed(seed, rank, *salt, 0x5EED)


def seed_all(seed: int):
    """The global RNGs the feedback noise reads (torch, CUDA, python, numpy)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _digest(tree, h) -> None:
    if isinstance(tree, torch.Tensor):
        t = tree.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(tree, dict):
        for k in sorted(tree, key=str):
            h.update(str(k).encode())
            _digest(tree[k], h)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _digest(v, h)
    else:
        h.update(repr(tree).encode())


@dataclass(frozen=True)
class StepTotals:
    """One optimizer step, summed over ranks: loss * images, top-1 and top-5 hits, images,
    whether any rank saw a non-finite loss or forward gradient, and whether any rank was asked
    to stop (a signal, interrupt.py): every rank then stops after this same step."""

    loss_sum: float
    top1: float
    top5: float
    seen: float
    bad_loss: bool
    bad_grad: bool
    stop: bool = False


@dataclass(frozen=True)
class Context:
    """This process's place in the run: rank, number of processes, and its device."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Rank 0 writes every file, prints, and shows the progress bar."""
        return self.rank == 0

    # -- setup ----------------------------------------------------------------------------
    def broadcast(self, tensors: Sequence[torch.Tensor]):
        if self.world > 1:
            for t in tensors:
                dist.broadcast(t, 0)

    def average(self, tensors: Sequence[torch.Tensor]):
        """In place, the mean over ranks; one all-reduce per dtype."""
        if self.world == 1 or not tensors:
            return
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            flat.div_(self.world)
            for t, v in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(v.view_as(t))

    # -- per step -------------------------------------------------------------------------
    def step_totals(
        self,
        params: Sequence[torch.nn.Parameter],
        local: torch.Tensor,
        share: float,
        stop: bool = False,
    ) -> StepTotals:
        """`local` = [loss * n, top1, top5, n, loss not finite] of this rank's shard. With
        several ranks, every gradient becomes sum_r share_r * grad_r (share_r = rank r's images
        / global batch), in one all-reduce that also sums `local`, the ranks' non-finite
        gradient flags and their stop requests, so every rank takes the same decisions. One
        device sync."""
        grads = [p.grad for p in params if p.grad is not None]
        local = torch.cat([local, local.new_tensor([float(stop)])])
        if self.world == 1:
            finite = (
                torch.stack([torch.isfinite(g).all() for g in grads]).all()
                if grads
                else torch.tensor(True, device=local.device)
            )
            values = torch.cat([local, (~finite).to(local.dtype).reshape(1)]).tolist()
            values = values[:5] + [values[6], values[5]]
        else:
            dtype = params[0].dtype
            flat = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                    for p in params
                ]
            )
            local_bad = (~torch.isfinite(flat).all()).to(dtype).reshape(1)
            buffer = torch.cat([flat.mul_(share), local.to(dtype), local_bad])
            dist.all_reduce(buffer)
            flat = buffer[: flat.numel()]
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                if p.grad is not None:
                    p.grad.copy_(g.view_as(p))
            reduced_bad = (~torch.isfinite(flat).all()).to(dtype).reshape(1)
            values = torch.cat([buffer[flat.numel() :].double(), reduced_bad.double()]).tolist()
            # [loss*n, top1, top5, n, bad loss, stop, local bad grads, reduced bad grads]
            values = values[:5] + [values[6] + values[7], values[5]]
        loss_sum, top1, top5, seen, bad_loss, bad_grad, stop_votes = values
        return StepTotals(loss_sum, top1, top5, seen, bad_loss > 0, bad_grad > 0, stop_votes > 0)

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any (one tiny all-reduce)."""
        if self.world == 1:
            return bool(flag)
        return self.sum_floats([float(bool(flag))])[0] > 0

    def sum_floats(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    # -- checkpoints ----------------------------------------------------------------------
    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def check_identical(self, tree, what: str):
        """Raise on every rank if ranks hold different `tree`s (compared by SHA-256)."""
        if self.world == 1:
            return
        h = hashlib.sha256()
        _digest(tree, h)
        digests = [None] * self.world
        dist.all_gather_object(digests, h.hexdigest())
        if len(set(digests)) > 1:
            differ = [r for r, d in enumerate(digests) if d != digests[0]]
            raise RuntimeError(
                f"ranks {differ} hold {what} different from rank 0's: the processes "
                "went out of sync (a bug: please report it with the command line)"
            )

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def context(device: str) -> Context:
    """The Context of this process: a single process unless a process group of more than one
    rank is initialised. With several ranks, --device cuda means cuda:LOCAL_RANK."""
    if not _initialized() or dist.get_world_size() == 1:
        return Context(device=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        if device != "cuda":
            raise ConfigError(
                f"with several processes pass --device cuda, not {device!r}: "
                "each rank uses cuda:LOCAL_RANK"
            )
        device = f"cuda:{_local_rank()}"
    return Context(rank, world, device, dist.get_backend())


def average_after_feedback(algorithm, ctx: Context):
    """Keep the feedback weights of an algorithm with its own feedback SGD (dtp, tp, drl)
    identical on every rank: its `train_feedback` is wrapped so that the feedback state
    (Algorithm.feedback_state: weights, biases or Q, then momentum) is averaged across ranks
    right after each call: each rank trains on its own shard, then one all-reduce per step."""
    inner = algorithm.train_feedback

    @functools.wraps(inner)
    def train_feedback(*args, **kwargs):
        result = inner(*args, **kwargs)
        ctx.average(algorithm.feedback_state())
        return result

    algorithm.train_feedback = train_feedback


def synchronise_algorithm(algorithm, ctx: Context):
    """Same start on every rank (rank 0's weights and feedback state), and the feedback kept
    identical from then on (see the module docstring)."""
    if ctx.world == 1:
        return
    ctx.broadcast(list(algorithm.model.state_dict().values()) + algorithm.feedback_state())
    trainer = getattr(algorithm, "trainer", None)
    if trainer is not None:  # ldrl: FeedbackTrainer synchronises inside its step
        if trainer.sync == "none":
            raise ConfigError(
                "FeedbackTrainer(sync='none') would let the ranks' feedback weights drift apart"
            )
    elif hasattr(algorithm, "train_feedback"):
        average_after_feedback(algorithm, ctx)
    elif algorithm.feedback_state():
        raise NotImplementedError(
            f"{type(algorithm).__name__}: no way to keep its feedback "
            "weights identical across processes"
        )
