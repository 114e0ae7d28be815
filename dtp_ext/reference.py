"""Every autograd computation of the library, in plain torch ops, the way the paper's code
computes it (docs/maths.md §1-§4, §10). The fused kernels are checked and timed against it, and the training
command's baselines compute with it:

- one block: the L-DRL loss and its gradients (docs/maths.md §2), vanilla DTP's reconstruction loss
  (docs/maths.md §10), and their feedback loops with torch.optim.SGD (`feedback_loop`);
- a chain of blocks: per-block records, the paper-form targets of DTP and TP (docs/maths.md §3, §10) and
  the layer-local losses' weight gradients (`dtp_weight_gradients` for L-DRL's DTP step);
- backprop through the same weights, for any model (`backprop_twin`, `backprop_gradients`).

It is deliberately literal: every L-DRL iteration re-runs the clean forward pass (the paper
does so to restore pool indices), evaluates G(y), G(F(x + eps)) and G(y + eta) with their
biases, and lets autograd differentiate the loss; targets use the paper's form
t_{n-1} = s_{n-1} + G(t_n) - G(s_n). Noise, when not given, is drawn per iteration as eps then
(L-DRL only) eta from torch's default generator, the order the fused loops use, so the same
seed gives the same noise.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import functional, ops
from .nn import DTPBlock, Linear

__all__ = [
    "block_input",
    "forward_block",
    "feedback_block",
    "ldrl_loss",
    "ldrl_loss_and_grads",
    "reconstruction_loss",
    "feedback_loop",
    "BlockRecord",
    "forward_records",
    "first_target",
    "penultimate_gradient_target",
    "targets",
    "layer_loss_gradients",
    "dtp_weight_gradients",
    "backprop_twin",
    "backprop_gradients",
]

FEEDBACK_LOSSES = ("ldrl", "reconstruction")
PENULTIMATE_TARGETS = ("feedback", "gradient")  # the first is docs/maths.md §10's form (`targets`)


# -- one block ------------------------------------------------------------------------------
def block_input(block, x: torch.Tensor) -> torch.Tensor:
    """x in the layout the block's op takes (rows for Linear, NCHW for Conv2d)."""
    return x.reshape(-1, block.in_features) if isinstance(block, Linear) else x


def forward_block(block, x, weight=None, bias=None):
    """(s, indices, pre_pool_shape) of s = pool(phi(op(x))), with autograd on the weights."""
    return block.forward_block(x, weight, bias)


def feedback_block(block, y, indices, pre_pool_shape, input_shape, V=None, c=None):
    """G(y) of `block` (the feedback weight its targets use, `target_feedback_weight`, unless
    V, c are given), with autograd."""
    return functional.feedback_block(
        y,
        block.target_feedback_weight if V is None else V,
        block.feedback_bias if c is None else c,
        input_shape,
        indices,
        pre_pool_shape,
        **block.functional_kwargs(),
    )


def ldrl_loss(block, x, noise_x, noise_y, V=None, c=None):
    """docs/maths.md §2 as the paper computes it, on the inputs functional.ldrl_loss takes (x in any
    shape the block accepts, noise_x shaped like x, noise_y like the block's output); the loss
    alone, differentiable with respect to V and c (the block's feedback weight and bias unless
    given)."""
    x, noise_x, noise_y = functional._ldrl_inputs(block, x, noise_x, noise_y)
    x = x.detach()
    with torch.no_grad():
        y, indices, pre_shape = forward_block(block, x)  # clean pass, again, for its indices
        y_noisy, indices_noisy, _ = forward_block(block, x + noise_x)
    r = feedback_block(block, y, indices, pre_shape, x.shape, V, c)
    r_noisy_x = feedback_block(block, y_noisy, indices_noisy, pre_shape, x.shape, V, c)
    r_noisy_y = feedback_block(
        block, y + noise_y.reshape(y.shape), indices, pre_shape, x.shape, V, c
    )
    noise_term = -2 * (noise_x * (r_noisy_x - r)).flatten(1).sum(1).mean()
    reconstruction = ((r_noisy_y - r) ** 2).flatten(1).sum(1).mean()
    return noise_term + reconstruction


def ldrl_loss_and_grads(block, x, noise_x, noise_y) -> ops.LdrlLoss:
    """LdrlLoss(loss, dloss/dV, dloss/dc) by autograd: functional.ldrl_loss's arguments and
    result, for comparison with it."""
    V = block.feedback_weight.detach().clone().requires_grad_(True)
    c = block.feedback_bias.detach().clone().requires_grad_(True)
    loss = ldrl_loss(block, x, noise_x, noise_y, V, c)
    grad_v, grad_c = torch.autograd.grad(loss, (V, c))
    return ops.LdrlLoss(loss.detach(), grad_v, grad_c)


def reconstruction_loss(block, x, eps, V=None, c=None):
    """Vanilla DTP's feedback loss (docs/maths.md §10), mean_b |(x + eps) - G(F(x + eps))|^2 with the
    noisy pass's pool indices; x in the block's op layout."""
    with torch.no_grad():
        y_noisy, indices, pre = forward_block(block, x + eps)
    r = feedback_block(block, y_noisy, indices, pre, x.shape, V, c)
    return ((x + eps - r) ** 2).flatten(1).sum(1).mean()


def feedback_loop(
    block,
    x,
    iterations: int,
    noise_std: float,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    noise_x=None,
    noise_y=None,
    optimizer_state: dict | None = None,
    *,
    loss: str = "ldrl",
):
    """docs/maths.md §4 (`loss="ldrl"`) or vanilla DTP's feedback training (`loss="reconstruction"`,
    docs/maths.md §10; no noise_y) for one block with torch.optim.SGD, on copies of its feedback weights.
    Returns (V, c, losses, optimizer_state); pass optimizer_state back in to carry momentum
    across batches."""
    if loss not in FEEDBACK_LOSSES:
        raise ValueError(f"feedback_loop: loss must be one of {FEEDBACK_LOSSES}, got {loss!r}")
    x = block_input(block, x).detach()
    V = block.feedback_weight.detach().clone().requires_grad_(True)
    c = block.feedback_bias.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([V, c], lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    with torch.no_grad():
        y_shape = forward_block(block, x)[0].shape
    losses = []
    for k in range(iterations):
        if noise_x is not None:
            eps = noise_x[k]
            eta = None if noise_y is None else noise_y[k]
        else:
            eps = torch.randn(x.shape, dtype=x.dtype, device=x.device) * noise_std
            eta = (
                torch.randn(y_shape, dtype=x.dtype, device=x.device) * noise_std
                if loss == "ldrl"
                else None
            )
        value = (
            ldrl_loss(block, x, eps, eta, V, c)
            if loss == "ldrl"
            else reconstruction_loss(block, x, eps, V, c)
        )
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.detach())
    return (
        V.detach(),
        c.detach(),
        torch.stack(losses) if losses else x.new_empty(0),
        opt.state_dict(),
    )


# -- a chain of blocks ----------------------------------------------------------------------
@dataclass
class BlockRecord:
    block: DTPBlock
    position: int  # index of the block among the chain's modules
    input: torch.Tensor  # detached, in the block's op layout
    output: torch.Tensor  # graph to this block's weights only
    indices: torch.Tensor | None
    pre_pool_shape: torch.Size


def forward_records(
    modules: Iterable[nn.Module], x: torch.Tensor
) -> tuple[torch.Tensor, list[BlockRecord]]:
    """Output and per-block records of a chain of modules (DTP blocks, joined by reshapes),
    each block's input detached: layer-local losses train each block's own weights only."""
    records = []
    for position, m in enumerate(modules):
        if isinstance(m, DTPBlock):
            inp = block_input(m, x).detach()
            out, indices, pre = forward_block(m, inp)
            records.append(BlockRecord(m, position, inp, out, indices, pre))
            x = out
        else:
            x = m(x)
    return x, records


def first_target(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """t_N = s_N - beta * grad of the sum-reduced cross-entropy (docs/maths.md §3, paper form)."""
    with torch.enable_grad():
        s = logits.detach().requires_grad_(True)
        grad = torch.autograd.grad(F.cross_entropy(s, labels, reduction="sum"), s)[0]
    return (s - beta * grad).detach()


def penultimate_gradient_target(
    records: list[BlockRecord], labels: torch.Tensor, beta: float
) -> torch.Tensor:
    """Lee et al. (2015)'s target for the last hidden block, t_{N-1} = s_{N-1} - beta *
    d(sum_b CE)/d s_{N-1}: one gradient step through the output block's own forward op (for
    the linear classifier, s_{N-1} - beta W^T (softmax - onehot))."""
    last = records[-1]
    with torch.enable_grad():
        s = last.input.detach().requires_grad_(True)
        out = forward_block(last.block, s)[0]
        grad = torch.autograd.grad(F.cross_entropy(out, labels, reduction="sum"), s)[0]
    return (s - beta * grad).detach().reshape(records[-2].output.shape)


def targets(
    logits: torch.Tensor,
    labels: torch.Tensor,
    records: list[BlockRecord],
    beta: float,
    *,
    difference: bool = True,
    penultimate: str = "feedback",
) -> list[torch.Tensor]:
    """Targets t_1..t_N (paper form, docs/maths.md §3) of DTP (`difference`: t_{n-1} = s_{n-1} +
    G_n(t_n) - G_n(s_n)) or TP (t_{n-1} = G_n(t_n)), all with clean pool indices. t_N = s_N -
    beta * grad of the sum-reduced CE; t_{N-1} through the output block's G ("feedback") or
    by `penultimate_gradient_target` ("gradient")."""
    if penultimate not in PENULTIMATE_TARGETS:
        raise ValueError(
            f"penultimate target must be one of {PENULTIMATE_TARGETS}, got {penultimate!r}"
        )
    result: list[torch.Tensor | None] = [None] * len(records)
    result[-1] = first_target(logits, labels, beta)
    top = len(records) - 1  # the highest block whose feedback propagates a target down
    if penultimate == "gradient" and len(records) > 1:
        result[-2] = penultimate_gradient_target(records, labels, beta)
        top -= 1
    with torch.no_grad():
        for n in range(top, 0, -1):
            r = records[n]
            t = feedback_block(r.block, result[n], r.indices, r.pre_pool_shape, r.input.shape)
            if difference:
                t = (
                    r.input
                    + t
                    - feedback_block(
                        r.block, r.output.detach(), r.indices, r.pre_pool_shape, r.input.shape
                    )
                )
            result[n - 1] = t.reshape(records[n - 1].output.shape)
    return result


def layer_loss_gradients(
    records: list[BlockRecord],
    targets: list[torch.Tensor],
    beta: float,
    *,
    accumulate: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Gradients (weight, bias or None) of sum_n 1/2 mean_b |s_n - t_n|^2, divided by beta
    (this library's units). With `accumulate`, also added to the parameters' .grad."""
    loss = sum(
        0.5 * ((r.output - t.reshape(r.output.shape)) ** 2).flatten(1).sum(1).mean()
        for r, t in zip(records, targets)
    )
    params = []
    for r in records:
        params += [r.block.weight] + ([r.block.bias] if r.block.bias is not None else [])
    grads = [g / beta for g in torch.autograd.grad(loss, params)]
    result, i = [], 0
    for r in records:
        has_bias = r.block.bias is not None
        result.append((grads[i], grads[i + 1] if has_bias else None))
        i += 2 if has_bias else 1
    if accumulate:
        for p, g in zip(params, grads):
            p.grad = g.clone() if p.grad is None else p.grad + g
    return result


def dtp_weight_gradients(blocks: Sequence, x: torch.Tensor, labels: torch.Tensor, beta: float):
    """Forward-weight gradients of one DTP step on a chain of blocks (docs/maths.md §3, paper form),
    divided by beta to be in this library's gradient units. Returns [(grad_W, grad_b), ...]."""
    logits, records = forward_records(blocks, x)
    return layer_loss_gradients(records, targets(logits, labels, records, beta), beta)


# -- backprop through the same weights ------------------------------------------------------
class _PlainBlock(nn.Module):
    """A DTP block's forward as ordinary autograd ops on the block's own weight tensors."""

    def __init__(self, block: DTPBlock):
        super().__init__()
        self.__dict__["block"] = block  # not a submodule: its feedback weights stay out of the twin
        # The block's own Parameter objects, so the twin's parameters() (an optimizer, a
        # gradient norm) sees the weights its forward uses.
        self.weight = block.weight
        self.bias = block.bias

    def forward(self, x):
        block = self.block
        if isinstance(block, Linear):
            rows = forward_block(block, x.reshape(-1, block.in_features))[0]
            return rows.reshape(*x.shape[:-1], block.out_features)
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d accepts
            return forward_block(block, x.unsqueeze(0))[0].squeeze(0)
        return forward_block(block, x)[0]

    def extra_repr(self):
        return f"backprop through {type(self.block).__name__}"


def backprop_twin(model: nn.Module) -> nn.Module:
    """The same network computing plain backprop, for any model (chains, residual networks,
    converted torchvision models): a structural copy that shares every parameter and buffer
    with `model` (gradients land in `model`'s parameters, BatchNorm statistics are updated in
    `model`'s buffers) and runs each DTP block's op, activation and max-pool with ordinary
    autograd; `twin.parameters()` yields those shared parameters (feedback weights excluded).
    Modules are shallow copies, so `twin.train()`/`.eval()` do not change `model`'s
    mode. Build it after `model.to(...)`: a later move of `model` does not reach the twin.
    (For an independent copy: `backprop_twin(copy.deepcopy(model))`.)"""
    memo = {}

    def twin(module):
        if id(module) in memo:  # a module registered at several places stays shared
            return memo[id(module)]
        if isinstance(module, DTPBlock):
            clone = _PlainBlock(module)
            clone.train(module.training)
        else:
            clone = copy.copy(module)  # shares _parameters and _buffers (the same dicts)
            clone._modules = OrderedDict(
                (name, None if child is None else twin(child))
                for name, child in module._modules.items()
            )
        memo[id(module)] = clone
        return clone

    return twin(model)


def backprop_gradients(model: nn.Module, blocks, x, y) -> list[torch.Tensor]:
    """Backprop's gradient of the batch-mean cross-entropy for each (name, block)'s weight,
    through `backprop_twin(model)`, so any model works. Eval mode: BatchNorm uses (and keeps)
    its running statistics."""
    twin = backprop_twin(model).eval()
    loss = F.cross_entropy(twin(x), y)
    return list(torch.autograd.grad(loss, [b.weight for _, b in blocks]))
