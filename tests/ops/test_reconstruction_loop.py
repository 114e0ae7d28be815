"""The fused vanilla-DTP feedback loop (reconstruction loss, docs/maths.md §10) against autograd."""

import torch

from dtp_ext import ops, reference
from tests.helpers.blocks import make_block


def test_fused_reconstruction_loop_equals_autograd(block_name):
    block, x = make_block(block_name)
    x = reference.block_input(block, x)
    k, sigma, lr = 4, 0.2, 0.01
    torch.manual_seed(5)
    V, c, ref_losses, state = reference.feedback_loop(block, x, k, sigma, lr, loss="reconstruction")
    torch.manual_seed(5)
    buffers = (torch.zeros_like(block.feedback_weight), torch.zeros_like(block.feedback_bias))
    losses = ops.reconstruction_feedback_loop(
        x,
        block.weight.detach(),
        None if block.bias is None else block.bias.detach(),
        block.feedback_weight,
        block.feedback_bias,
        *buffers,
        k,
        sigma,
        lr,
        0.9,
        0.0,
        3,
        block.geometry(),
    )
    assert losses.shape == (k,)
    torch.testing.assert_close(losses[-1].item(), ref_losses[-1].item(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(block.feedback_weight, V, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(block.feedback_bias, c, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(
        buffers[0], state["state"][0]["momentum_buffer"], rtol=1e-9, atol=1e-10
    )


def test_weight_decay_and_explicit_noise():
    block, x = make_block("conv-elu-pool2")
    noise = torch.randn(3, *x.shape, dtype=x.dtype) * 0.1
    V, c, _, _ = reference.feedback_loop(
        block,
        x,
        3,
        0.1,
        lr=0.01,
        momentum=0.9,
        weight_decay=0.05,
        noise_x=noise,
        loss="reconstruction",
    )
    buffers = (torch.zeros_like(block.feedback_weight), torch.zeros_like(block.feedback_bias))
    ops.reconstruction_feedback_loop(
        x,
        block.weight.detach(),
        block.bias.detach(),
        block.feedback_weight,
        block.feedback_bias,
        *buffers,
        3,
        0.1,
        0.01,
        0.9,
        0.05,
        2,
        block.geometry(),
        noise,
    )
    torch.testing.assert_close(block.feedback_weight, V, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(block.feedback_bias, c, rtol=1e-9, atol=1e-10)


def test_opcheck_reconstruction_loop():
    block, x = make_block("conv-relu-pool2-odd")
    fw, fb = block.feedback_weight.clone(), block.feedback_bias.clone()
    torch.library.opcheck(
        torch.ops.dtp_ext.reconstruction_feedback_loop.default,
        (
            x,
            block.weight.detach(),
            block.bias.detach(),
            fw,
            fb,
            torch.zeros_like(fw),
            torch.zeros_like(fb),
            2,
            0.1,
            0.01,
            0.9,
            0.0,
            1,
            torch.randn(2, *x.shape, dtype=x.dtype),
            *block.geometry().args(),
        ),
    )


def test_float16_bias_gradient_accumulates_in_float32():
    """A float16 reconstruction loop with float32 master feedback weights: the bias gradient is
    a sum over the batch far past float16's 65504 here; summed in float32 it stays finite and
    matches the float32 loop (a float16 partial sum made the bias and its momentum inf)."""
    import pytest

    torch.manual_seed(0)
    block = __import__("dtp_ext").Linear(8, 4)
    x32 = torch.full((4096, 8), 60.0) + torch.randn(4096, 8)
    noise = torch.randn(1, *x32.shape) * 0.1
    results = {}
    for dtype in (torch.float32, torch.float16):
        v, c = block.feedback_weight.clone(), block.feedback_bias.clone()
        mv, mc = torch.zeros_like(v), torch.zeros_like(c)
        try:
            ops.reconstruction_feedback_loop(
                x32.to(dtype),
                block.weight.detach().to(dtype),
                block.bias.detach().to(dtype),
                v,
                c,
                mv,
                mc,
                1,
                0.1,
                1e-6,
                0.9,
                0.0,
                1,
                block.geometry(),
                noise.to(dtype),
            )
        except (RuntimeError, NotImplementedError) as exc:  # no float16 products on this CPU
            pytest.skip(f"float16 on the CPU: {exc}")
        results[dtype] = (c, mc)
    c16, mc16 = results[torch.float16]
    assert torch.isfinite(c16).all() and torch.isfinite(mc16).all()
    # The case: the batch sum behind the bias gradient (the momentum holds it times 2/B) is
    # far beyond float16's range.
    assert mc16.abs().max() * x32.shape[0] / 2 > 65504
    torch.testing.assert_close(mc16, results[torch.float32][1], rtol=2e-2, atol=0)
