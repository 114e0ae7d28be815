"""The fused vanilla-DTP feedback loop (reconstruction loss, SPEC §5) against autograd."""
import copy

import torch

from dtp_ext import ops, reference
from dtp_ext.train.algorithms.feedback_sgd import MomentumSGD
from dtp_ext.train.algorithms.reconstruction import reconstruction_loss, train_reconstruction

from conftest import make_block


def test_fused_reconstruction_loop_equals_autograd(block_name):
    block, x = make_block(block_name)
    x = reference.block_input(block, x)
    k, sigma, lr = 4, 0.2, 0.01
    ref_block = copy.deepcopy(block)
    sgd = MomentumSGD(0.9)
    torch.manual_seed(5)
    last = train_reconstruction("b", ref_block, x, k, sigma, lr, sgd)
    torch.manual_seed(5)
    buffers = (torch.zeros_like(block.feedback_weight), torch.zeros_like(block.feedback_bias))
    losses = ops.reconstruction_feedback_loop(
        x, block.weight.detach(), None if block.bias is None else block.bias.detach(),
        block.feedback_weight, block.feedback_bias, *buffers, k, sigma, lr, 0.9, 0.0, 3,
        block.geometry())
    assert losses.shape == (k,)
    torch.testing.assert_close(losses[-1].item(), last, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(block.feedback_weight, ref_block.feedback_weight, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(block.feedback_bias, ref_block.feedback_bias, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(buffers[0], sgd.buffers["b.weight"], rtol=1e-9, atol=1e-10)


def reference_sgd(block, x, noise, lr, momentum, weight_decay):
    """torch.optim.SGD on the autograd reconstruction loss, one step per noise draw:
    (V, c, per-iteration losses)."""
    V = block.feedback_weight.detach().clone().requires_grad_(True)
    c = block.feedback_bias.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([V, c], lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = []
    for eps in noise:
        opt.zero_grad()
        loss = reconstruction_loss(block, x, eps, V, c)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return V.detach(), c.detach(), torch.stack(losses) if losses else x.new_empty(0)


def test_weight_decay_and_explicit_noise():
    block, x = make_block("conv-elu-pool2")
    noise = torch.randn(3, *x.shape, dtype=x.dtype) * 0.1
    V, c, _ = reference_sgd(block, x, noise, lr=0.01, momentum=0.9, weight_decay=0.05)
    buffers = (torch.zeros_like(block.feedback_weight), torch.zeros_like(block.feedback_bias))
    ops.reconstruction_feedback_loop(x, block.weight.detach(), block.bias.detach(),
                                     block.feedback_weight, block.feedback_bias, *buffers, 3, 0.1,
                                     0.01, 0.9, 0.05, 2, block.geometry(), noise)
    torch.testing.assert_close(block.feedback_weight, V, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(block.feedback_bias, c, rtol=1e-9, atol=1e-10)


def test_opcheck_reconstruction_loop():
    block, x = make_block("conv-relu-pool2-odd")
    fw, fb = block.feedback_weight.clone(), block.feedback_bias.clone()
    torch.library.opcheck(torch.ops.dtp_ext.reconstruction_feedback_loop.default,
                          (x, block.weight.detach(), block.bias.detach(), fw, fb, torch.zeros_like(fw),
                           torch.zeros_like(fb), 2, 0.1, 0.01, 0.9, 0.0, 1,
                           torch.randn(2, *x.shape, dtype=x.dtype), *block.geometry().args()))
