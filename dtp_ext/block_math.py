"""A DTP block and its feedback block in plain torch.nn.functional ops, with autograd (SPEC §1).

The unfused maths, shared by `dtp_ext.reference` (the paper's way of computing L-DRL, used by
tests and benchmarks) and by the training command's baselines (BP through the same weights,
vanilla DTP, TP, DRL), which need ordinary autograd graphs of single blocks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .nn import Linear, activation_fn


def block_input(block, x: torch.Tensor) -> torch.Tensor:
    """x in the layout the block's op takes (rows for Linear, NCHW for Conv2d)."""
    return x.reshape(-1, block.in_features) if isinstance(block, Linear) else x


def forward_block(block, x, weight=None, bias=None):
    """(s, indices, pre_pool_shape) of s = pool(phi(op(x))), with autograd on the weights."""
    return block.forward_block(x, weight, bias)


def feedback_block(block, y, indices, pre_pool_shape, input_shape, V=None, c=None):
    """G(y) = V phi(unpool(y)) + c (SPEC §1): MaxUnpool2d, the activation, then the linear /
    transposed-conv map with the same stride, padding and dilation as the forward conv."""
    V = block.feedback_weight if V is None else V
    c = block.feedback_bias if c is None else c
    if indices is not None:
        y = F.max_unpool2d(y, indices, block.pool, block.pool, output_size=pre_pool_shape[-2:])
    u = activation_fn(block.activation)(y)
    if isinstance(block, Linear):
        return F.linear(u, V, c)
    output_padding = []
    for d in range(2):
        reached = ((u.shape[2 + d] - 1) * block.stride[d] - 2 * block.numeric_padding[d]
                   + block.dilation[d] * (block.kernel_size[d] - 1) + 1)
        output_padding.append(input_shape[2 + d] - reached)
    return F.conv_transpose2d(u, V, c, block.stride, block.numeric_padding, output_padding,
                              block.groups, block.dilation)
