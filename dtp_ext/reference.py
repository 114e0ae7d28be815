"""Pure-PyTorch autograd reference of SPEC §2–§3, computed the way the paper's code does.

Used only by tests and benchmarks to check and time the fused kernels. It is deliberately
literal: every iteration re-runs the clean forward pass (the paper does so to restore pool
indices), evaluates G(y), G(F(x + eps)) and G(y + eta) with their biases, and lets autograd
differentiate the loss; targets use the paper's form t_{n-1} = s_{n-1} + G(t_n) - G(s_n).
Noise, when not given, is drawn per iteration as eps then eta from torch's default generator,
the order the fused loop uses, so the same seed gives the same noise.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .block_math import block_input, feedback_block, forward_block

__all__ = ["block_input", "forward_block", "feedback_block", "ldrl_loss", "ldrl_loss_and_grads",
           "feedback_loop", "dtp_weight_gradients"]


def ldrl_loss(block, x, noise_x, noise_y, V=None, c=None):
    """SPEC §2.1 as the paper computes it; differentiable with respect to V and c."""
    x = block_input(block, x).detach()
    with torch.no_grad():
        y, indices, pre_shape = forward_block(block, x)  # clean pass, again, for its indices
        y_noisy, indices_noisy, _ = forward_block(block, x + noise_x)
    r = feedback_block(block, y, indices, pre_shape, x.shape, V, c)
    r_noisy_x = feedback_block(block, y_noisy, indices_noisy, pre_shape, x.shape, V, c)
    r_noisy_y = feedback_block(block, y + noise_y.reshape(y.shape), indices, pre_shape, x.shape, V, c)
    noise_term = -2 * (noise_x * (r_noisy_x - r)).flatten(1).sum(1).mean()
    reconstruction = ((r_noisy_y - r) ** 2).flatten(1).sum(1).mean()
    return noise_term + reconstruction


def ldrl_loss_and_grads(block, x, noise_x, noise_y):
    """(loss, dloss/dV, dloss/dc) by autograd, for comparison with dtp_ext.functional."""
    V = block.feedback_weight.detach().clone().requires_grad_(True)
    c = block.feedback_bias.detach().clone().requires_grad_(True)
    loss = ldrl_loss(block, x, noise_x, noise_y, V, c)
    grad_v, grad_c = torch.autograd.grad(loss, (V, c))
    return loss.detach(), grad_v, grad_c


def feedback_loop(block, x, iterations: int, noise_std: float, lr: float, momentum: float = 0.9,
                  weight_decay: float = 0.0, noise_x=None, noise_y=None,
                  optimizer_state: Optional[dict] = None):
    """SPEC §2.2 for one block with torch.optim.SGD. Returns (V, c, losses, optimizer_state);
    pass optimizer_state back in to carry momentum across batches."""
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
        if noise_x is None:
            eps = torch.randn(x.shape, dtype=x.dtype, device=x.device) * noise_std
            eta = torch.randn(y_shape, dtype=x.dtype, device=x.device) * noise_std
        else:
            eps, eta = noise_x[k], noise_y[k]
        loss = ldrl_loss(block, x, eps, eta, V, c)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return V.detach(), c.detach(), torch.stack(losses) if losses else x.new_empty(0), opt.state_dict()


def dtp_weight_gradients(blocks: Sequence, x: torch.Tensor, labels: torch.Tensor, beta: float):
    """Forward-weight gradients of one DTP step on a chain of blocks (SPEC §3, paper form),
    divided by beta to be in this library's gradient units. Returns [(grad_W, grad_b), ...]."""
    inputs, outputs, indices, pre_shapes = [], [], [], []
    s = x
    for block in blocks:
        block_x = block_input(block, s).detach()
        out, idx, pre = forward_block(block, block_x)
        inputs.append(block_x)
        outputs.append(out)
        indices.append(idx)
        pre_shapes.append(pre)
        s = out
    s_last = outputs[-1]
    grad_sum_ce = torch.autograd.grad(F.cross_entropy(s_last, labels, reduction="sum"), s_last)[0]
    targets: List[Optional[torch.Tensor]] = [None] * len(blocks)
    targets[-1] = (s_last - beta * grad_sum_ce).detach()
    with torch.no_grad():
        for n in range(len(blocks) - 1, 0, -1):
            b = blocks[n]
            g_t = feedback_block(b, targets[n], indices[n], pre_shapes[n], inputs[n].shape)
            g_s = feedback_block(b, outputs[n], indices[n], pre_shapes[n], inputs[n].shape)
            targets[n - 1] = (inputs[n] + g_t - g_s).reshape(outputs[n - 1].shape)
    loss = sum(0.5 * ((o - t) ** 2).flatten(1).sum(1).mean() for o, t in zip(outputs, targets))
    grads = []
    for block in blocks:
        params = [block.weight] + ([block.bias] if block.bias is not None else [])
        g = torch.autograd.grad(loss, params, retain_graph=True)
        grads.append((g[0] / beta, g[1] / beta if len(g) > 1 else None))
    return grads
