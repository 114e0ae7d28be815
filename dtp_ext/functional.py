"""The functional form of a DTP block (docs/maths.md §1), as torch.nn.functional is for torch.nn.

`block_forward` and `feedback_block` take tensors and the block's options, in plain torch ops
with autograd: dtp_ext.Linear/Conv2d run `block_forward` as their forward, and the autograd
reference (reference.py) and the training command's baselines build on both. `ldrl_loss` is
the fused L-DRL loss of one block, through the same kernels as FeedbackTrainer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

# The one activation registry: a block's `activation` -> (phi, the torch.nn module that
# convert folds into a block as that activation). The kernels implement the same three.
_ACTIVATIONS = {"relu": (F.relu, nn.ReLU), "elu": (F.elu, nn.ELU), "tanh": (torch.tanh, nn.Tanh)}
ACTIVATIONS = (None, *_ACTIVATIONS)


def _identity(z):
    return z


def activation_fn(name: str | None):
    """The function phi of a block's `activation` (None, or the kernels' 'none': identity)."""
    return _identity if name in (None, "none") else _ACTIVATIONS[name][0]


def activation_name(module: nn.Module) -> str | None:
    """The `activation` whose torch.nn module `module` is an instance of (exactly), else None."""
    return next((name for name, (_, cls) in _ACTIVATIONS.items() if type(module) is cls), None)


def block_forward(
    x, weight, bias=None, *, activation=None, pool=None, stride=1, padding=0, dilation=1, groups=1
):
    """(s, pool indices or None, shape of phi(op(x))) of s = pool(phi(op(x))): op is F.linear
    for a 2-D weight (x: rows), else F.conv2d (x: NCHW, numeric padding); pool is a max-pool
    with kernel = stride = `pool` (None or 1: none)."""
    if weight.dim() == 2:
        z = F.linear(x, weight, bias)
    else:
        z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    h = activation_fn(activation)(z)
    if pool and pool > 1:
        s, indices = F.max_pool2d(h, pool, pool, return_indices=True)
        return s, indices, h.shape
    return h, None, h.shape


def feedback_block(
    y,
    feedback_weight,
    feedback_bias,
    input_shape,
    indices=None,
    pre_pool_shape=None,
    *,
    activation=None,
    pool=None,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
):
    """G(y) = V phi(unpool(y)) + c (docs/maths.md §1): MaxUnpool2d with the forward's indices, the
    activation, then the linear / transposed-conv map with the same stride, padding and
    dilation as the forward conv, its output sized to the forward input's `input_shape`."""
    if indices is not None:
        y = F.max_unpool2d(y, indices, pool, pool, output_size=pre_pool_shape[-2:])
    u = activation_fn(activation)(y)
    if feedback_weight.dim() == 2:
        return F.linear(u, feedback_weight, feedback_bias)
    stride, padding, dilation = (_pair(v) for v in (stride, padding, dilation))
    kernel_size = feedback_weight.shape[2:]
    output_padding = [
        input_shape[2 + d]
        - (
            (u.shape[2 + d] - 1) * stride[d]
            - 2 * padding[d]
            + dilation[d] * (kernel_size[d] - 1)
            + 1
        )
        for d in range(2)
    ]
    return F.conv_transpose2d(
        u, feedback_weight, feedback_bias, stride, padding, output_padding, groups, dilation
    )


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _ldrl_inputs(block, x: torch.Tensor, noise_x: torch.Tensor, noise_y: torch.Tensor):
    """(x, noise_x, noise_y) of an L-DRL loss in the block's op layout: rows for a Linear (x
    of any shape with in_features last), a batch of one for an unbatched (C, H, W) Conv2d
    input. Both `ldrl_loss`es (this module's and reference.py's) take their inputs so."""
    weight = block.weight
    if weight.dim() == 2:
        x = x.reshape(-1, weight.shape[1])
        return x, noise_x.reshape(x.shape), noise_y.reshape(x.shape[0], weight.shape[0])
    if x.dim() == 3:
        return x.unsqueeze(0), noise_x.unsqueeze(0), noise_y.unsqueeze(0)
    return x, noise_x, noise_y


@torch.no_grad()
def ldrl_loss(block, x: torch.Tensor, noise_x: torch.Tensor, noise_y: torch.Tensor) -> ops.LdrlLoss:
    """docs/maths.md §2 for one dtp_ext.Linear/Conv2d block on input batch `x` with explicit, already
    scaled noise (noise_x has x's shape, noise_y the block output's). Returns
    LdrlLoss(loss, grad_feedback_weight, grad_feedback_bias) through the same fused kernels as
    FeedbackTrainer (ops.ldrl_loss, on the block's tensors); the bias gradient is exactly zero
    (both loss terms are differences of G, so c cancels). reference.ldrl_loss_and_grads takes
    the same arguments and returns the same by autograd."""
    if not hasattr(block, "geometry") or not hasattr(block, "feedback_weight"):
        raise TypeError(
            f"ldrl_loss: layer must be a dtp_ext.Linear or dtp_ext.Conv2d, got {type(block).__name__}"
        )
    x, noise_x, noise_y = _ldrl_inputs(block, x, noise_x, noise_y)
    return ops.ldrl_loss(
        x, block.weight, block.bias, block.feedback_weight, noise_x, noise_y, block.geometry()
    )
