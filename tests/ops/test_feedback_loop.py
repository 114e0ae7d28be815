"""The fused K-iteration feedback loop (docs/maths.md §4) against torch.optim.SGD on the reference."""

import pytest
import torch

import dtp_ext
from dtp_ext import metrics, ops, reference
from tests.helpers.blocks import make_block, output_shape


def run_fused(
    block, x, k, sigma, lr, momentum, wd, noise_x=None, noise_y=None, buffers=None, chunk=3
):
    buffers = buffers or (
        torch.zeros_like(block.feedback_weight),
        torch.zeros_like(block.feedback_bias),
    )
    x = reference.block_input(block, x)
    losses = ops.ldrl_feedback_loop(
        x,
        block.weight.detach(),
        None if block.bias is None else block.bias.detach(),
        block.feedback_weight,
        block.feedback_bias,
        buffers[0],
        buffers[1],
        k,
        sigma,
        lr,
        momentum,
        wd,
        chunk,
        block.geometry(),
        noise_x,
        noise_y,
    )
    return losses, buffers


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_loop_with_explicit_noise_equals_reference_sgd(block_name, wd):
    block, x = make_block(block_name)
    k, sigma, lr, momentum = 5, 0.2, 0.05, 0.9
    xin = reference.block_input(block, x)
    noise_x = torch.randn(k, *xin.shape, dtype=x.dtype) * sigma
    noise_y = torch.randn(k, *output_shape(block, x), dtype=x.dtype) * sigma
    ref_v, ref_c, ref_losses, state = reference.feedback_loop(
        block, x, k, sigma, lr, momentum, wd, noise_x, noise_y
    )
    losses, buffers = run_fused(block, x, k, sigma, lr, momentum, wd, noise_x, noise_y)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(block.feedback_weight, ref_v, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(block.feedback_bias, ref_c, rtol=1e-9, atol=1e-11)
    # A second batch continues from the momentum buffers, as SGD's state does.
    losses2, _ = run_fused(
        block, x, k, sigma, lr, momentum, wd, noise_x.flip(0), noise_y.flip(0), buffers
    )
    block_ref = make_block(block_name)[0]
    block_ref.feedback_weight.copy_(ref_v)
    block_ref.feedback_bias.copy_(ref_c)
    ref_v2, ref_c2, ref_losses2, _ = reference.feedback_loop(
        block_ref, x, k, sigma, lr, momentum, wd, noise_x.flip(0), noise_y.flip(0), state
    )
    torch.testing.assert_close(losses2, ref_losses2, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(block.feedback_weight, ref_v2, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("block_name", ["conv-elu-pool2", "linear-tanh"])
def test_generator_noise_matches_reference_draws_and_is_chunk_independent(block_name):
    block, x = make_block(block_name)
    k, sigma, lr = 7, 0.3, 0.02
    start_v = block.feedback_weight.clone()
    torch.manual_seed(123)
    ref_v, _, ref_losses, _ = reference.feedback_loop(block, x, k, sigma, lr)
    results = []
    for chunk in (1, 3, 7):
        block.feedback_weight.copy_(start_v)
        torch.manual_seed(123)
        losses, _ = run_fused(block, x, k, sigma, lr, 0.9, 0.0, chunk=chunk)
        results.append((losses, block.feedback_weight.clone()))
        torch.testing.assert_close(losses, ref_losses, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(block.feedback_weight, ref_v, rtol=1e-9, atol=1e-11)
    # The same seed gives bitwise the same run whatever the chunking.
    for losses, v in results[1:]:
        assert torch.equal(losses, results[0][0])
        assert torch.equal(v, results[0][1])


def test_zero_iterations_leave_weights_alone():
    block, x = make_block("linear-tanh")
    before = block.feedback_weight.clone()
    losses, _ = run_fused(block, x, 0, 0.1, 0.1, 0.9, 0.0)
    assert losses.shape == (0,)
    assert torch.equal(before, block.feedback_weight)


def train_jmc(block, x, steps=2000, sigma=0.1, lr=0.02):
    torch.manual_seed(0)
    run_fused(block, x, steps, sigma, lr, 0.9, 0.0, chunk=50)
    return metrics.weight_alignment(block)["angle"]


@pytest.mark.integration
def test_jmc_linear_block_aligns_to_one_degree():
    """docs/maths.md §13.2: L-DRL drives angle(W, V^T) to about 1 degree on a linear block."""
    torch.manual_seed(0)
    block = dtp_ext.Linear(20, 10).double()
    x = torch.randn(256, 20, dtype=torch.float64)
    start = metrics.weight_alignment(block)["angle"]
    angle = train_jmc(block, x)
    assert start > 60
    assert angle < 1.5, f"angle {angle:.2f} deg after 2000 steps"


@pytest.mark.integration
def test_jmc_conv_block_aligns_with_transposed_conv():
    """docs/maths.md §13.2 for conv vs transposed conv (feedback weight in the conv's own shape)."""
    torch.manual_seed(0)
    block = dtp_ext.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(256, 3, 6, 6, dtype=torch.float64)
    angle = train_jmc(block, x, sigma=0.1, lr=0.01)
    assert angle < 1.5, f"angle {angle:.2f} deg after 2000 steps"
