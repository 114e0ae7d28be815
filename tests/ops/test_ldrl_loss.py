"""The fused L-DRL loss and gradient (docs/maths.md §2) against the autograd reference."""

import pytest
import torch

import dtp_ext
from dtp_ext import functional, reference
from tests.helpers.blocks import make_block, output_shape


def noise_for(block, x, sigma=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    noise_x = torch.randn(x.shape, generator=g, dtype=x.dtype) * sigma
    noise_y = torch.randn(output_shape(block, x), generator=g, dtype=x.dtype) * sigma
    return noise_x, noise_y


def test_fused_loss_and_gradients_equal_reference_float64(block_name):
    block, x = make_block(block_name)
    noise_x, noise_y = noise_for(block, x)
    loss, grad_v, grad_c = functional.ldrl_loss(block, x, noise_x, noise_y)
    ref_loss, ref_v, ref_c = reference.ldrl_loss_and_grads(block, x, noise_x, noise_y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_v, ref_v, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(grad_c) == 0  # exactly zero by construction (docs/maths.md §2)
    torch.testing.assert_close(ref_c, torch.zeros_like(ref_c), rtol=0, atol=1e-12)


def test_float32_matches_float64(block_name):
    block, x = make_block(block_name)
    noise_x, noise_y = noise_for(block, x)
    loss64, grad64, _ = functional.ldrl_loss(block, x, noise_x, noise_y)
    block32 = block.float()
    loss32, grad32, _ = functional.ldrl_loss(block32, x.float(), noise_x.float(), noise_y.float())
    assert grad32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad32.double(), grad64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_name", ["conv-elu-pool2", "linear-tanh"])
def test_non_contiguous_inputs_give_the_same_result(block_name):
    block, x = make_block(block_name)
    noise_x, noise_y = noise_for(block, x)
    expected = functional.ldrl_loss(block, x, noise_x, noise_y)
    if x.dim() == 4:
        strided = (
            x.to(memory_format=torch.channels_last),
            noise_x.to(memory_format=torch.channels_last),
            noise_y.to(memory_format=torch.channels_last),
        )
    else:
        strided = (
            x.t().contiguous().t(),
            noise_x.t().contiguous().t(),
            noise_y.t().contiguous().t(),
        )
    assert not strided[0].is_contiguous()
    got = functional.ldrl_loss(block, *strided)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_linear_loss_and_gradient_expectation_monte_carlo():
    """docs/maths.md §13.1: E[loss] = sigma^2 (|V - W^T|^2 - |W|^2), E[grad] = 2 sigma^2 (V - W^T)."""
    torch.manual_seed(0)
    block = dtp_ext.Linear(6, 4, bias=True).double()
    sigma, batch, draws = 0.2, 512, 400
    x = torch.randn(batch, 6, dtype=torch.float64)
    losses, grads = [], []
    for _ in range(draws):
        nx = torch.randn(batch, 6, dtype=torch.float64) * sigma
        ny = torch.randn(batch, 4, dtype=torch.float64) * sigma
        loss, grad, _ = functional.ldrl_loss(block, x, nx, ny)
        losses.append(loss)
        grads.append(grad)
    W, V = block.weight.detach(), block.feedback_weight
    expected_loss = sigma**2 * ((V - W.t()).pow(2).sum() - W.pow(2).sum())
    expected_grad = 2 * sigma**2 * (V - W.t())
    mean_loss, mean_grad = torch.stack(losses).mean(), torch.stack(grads).mean(0)
    assert abs(mean_loss - expected_loss) < 0.02 * expected_loss.abs() + 1e-3
    rel = (mean_grad - expected_grad).norm() / expected_grad.norm()
    assert rel < 0.03, f"mean gradient off by {rel:.3%}"
