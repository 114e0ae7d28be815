"""One block's fused feedback loop for one step (docs/maths.md §4): the checks the kernels cannot
make, mixed precision, the rank synchronisation, CUDA graphs and memory chunking
(docs/feedback_trainer.md §4-§8)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import cuda_graphs, hardware, ops
from ..cuda_graphs import LoopGraphs
from ..nn import DTPBlock
from ..user_warnings import warn_at_caller
from .ranks import average_across_ranks


@dataclass(frozen=True)
class LoopOptions:
    """What every block's loop of a step shares: the trainer's settings when the step began."""

    momentum: float
    weight_decay: float
    compute_dtype: torch.dtype | None  # None: the recorded input's dtype
    cuda_graphs: bool
    sync: str  # "gradients", "weights" or "none" (also for a single process)
    world: int  # ranks in the process group
    # How many iterations share one batched F(x + eps): (block, input) -> count.
    chunk_iterations: Callable[[DTPBlock, torch.Tensor], int]


def check_block(name: str, block: DTPBlock, parameters: dict):
    """What the kernels cannot see: a stale or empty recorded input, feedback buffers that
    alias a forward parameter of the model (`parameters`: storage pointer -> parameter name)."""
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


_WARNED_BFLOAT16: set[str] = set()


def _warn_emulated_bfloat16(device: torch.device):
    """Once per device type and process: bfloat16 asked for where it is emulated (slower)."""
    if device.type in _WARNED_BFLOAT16:
        return
    _WARNED_BFLOAT16.add(device.type)
    missing = hardware.missing_bfloat16(device)
    if missing is not None:
        warn_at_caller(
            f"FeedbackTrainer: bfloat16 feedback loops on {device.type} need {missing}; "
            "float32 (compute_dtype=None) is faster here "
            "(dtp_ext.hardware.preferred_compute_dtype picks for you)",
        )


def compute_dtype(block: DTPBlock, x: torch.Tensor, requested: torch.dtype | None) -> torch.dtype:
    """The dtype the loop's products run in: `requested` for a float32 block, else the
    recorded input's (bfloat16 after an autocast forward, else the model's)."""
    dtype = x.dtype
    if requested is not None and block.weight.dtype == torch.float32:
        dtype = requested
    if dtype == torch.bfloat16:
        _warn_emulated_bfloat16(x.device)
    return dtype


def train_block(
    name: str,
    block: DTPBlock,
    x: torch.Tensor,
    state: tuple[torch.Tensor, ...],
    iterations: int,
    noise_std: float,
    lr: float,
    noise_x: torch.Tensor | None,
    noise_y: torch.Tensor | None,
    options: LoopOptions,
    graphs: LoopGraphs,
) -> tuple[torch.Tensor, str]:
    """Run `iterations` feedback iterations of `block` on its recorded input `x`, updating
    `state` (feedback weight and bias, their momentum buffers) in place; the losses of every
    iteration and the kernel that computed them."""
    k, sigma, sync, world = iterations, noise_std, options.sync, options.world
    weight, bias = block.weight, block.bias
    dtype = compute_dtype(block, x, options.compute_dtype)
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
            options.momentum,
            options.weight_decay,
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
            average_across_ranks(state + (losses[-1],), world)
        return (torch.cat(losses) if losses else x.new_empty(0)), ops.last_kernel()
    chunk = min(max(k, 1), options.chunk_iterations(block, x))
    if options.cuda_graphs and k > 0 and cuda_graphs.applies(x, noise_x, noise_y):
        settings = (k, sigma, lr, options.momentum, options.weight_decay, chunk, block.geometry())
        losses, kernel = graphs.run(
            name,
            (x, weight, bias),
            state,
            settings,
            lambda inputs: loop(k, None, None, chunk, inputs),
        )
    else:
        losses, kernel = loop(k, noise_x, noise_y, chunk), ops.last_kernel()
    if sync == "weights":
        average_across_ranks(state + (losses,), world)
    return losses, kernel
