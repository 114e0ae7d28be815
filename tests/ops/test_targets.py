"""Difference-target propagation (docs/maths.md §3) and the gradient checks of docs/maths.md §13.3–13.5."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtp_ext
from dtp_ext import metrics, ops, reference
from tests.helpers.blocks import make_block
from tests.helpers.models import dtp_and_bp_grads


@pytest.mark.parametrize("beta", [0.7, 2.0])
def test_propagated_target_equals_reference_difference(block_name, beta):
    block, x = make_block(block_name)
    xin = reference.block_input(block, x)
    s, idx, pre = reference.forward_block(block, xin)
    s, delta = s.detach(), torch.randn(s.shape, dtype=x.dtype)
    scale = beta * xin.shape[0]
    got = ops.propagate_target(
        s if block.activation or block.pool else None,
        idx,
        delta,
        block.feedback_weight,
        scale,
        xin.shape,
        block.geometry(),
    )
    g_s = reference.feedback_block(block, s, idx, pre, xin.shape)
    g_t = reference.feedback_block(block, s - scale * delta, idx, pre, xin.shape)
    torch.testing.assert_close(got, (g_s - g_t) / scale, rtol=1e-9, atol=1e-10)


def test_weight_gradient_is_the_local_vector_jacobian_product(block_name):
    block, x = make_block(block_name)
    xin = reference.block_input(block, x)
    s, idx, _ = reference.forward_block(block, xin)
    delta = torch.randn(s.shape, dtype=x.dtype)
    params = [block.weight] + ([block.bias] if block.bias is not None else [])
    expected = torch.autograd.grad(s, params, delta)
    gw, gb = ops.block_weight_grad(
        xin,
        s.detach() if block.activation or block.pool else None,
        idx,
        delta,
        block.weight.detach(),
        block.geometry(),
    )
    torch.testing.assert_close(gw, expected[0], rtol=1e-10, atol=1e-12)
    if block.bias is not None:
        torch.testing.assert_close(gb, expected[1], rtol=1e-10, atol=1e-12)


def small_vgg(activation="elu", channels=(4, 6, 8), classes=5, beta=0.7, bias=True):
    layers, cin = [], 3
    for c in channels:
        layers.append(
            dtp_ext.Conv2d(
                cin, c, 3, padding=1, bias=bias, activation=activation, pool=2, beta=beta
            )
        )
        cin = c
    layers += [nn.Flatten(), dtp_ext.Linear(cin, classes, bias=bias, beta=beta)]
    return nn.Sequential(*layers).double()


def test_full_network_gradients_equal_reference_targets():
    """Autograd through the DTP blocks gives the paper's target-propagation gradients / beta."""
    torch.manual_seed(0)
    model = small_vgg()
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    blocks = [m for _, m in dtp_ext.dtp_blocks(model)]
    expected = reference.dtp_weight_gradients(blocks, x, y, beta=0.7)
    for block, (gw, gb) in zip(blocks, expected):
        torch.testing.assert_close(block.weight.grad, gw, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(block.bias.grad, gb, rtol=1e-8, atol=1e-10)


def test_output_block_gradient_equals_backprop_for_any_feedback():
    """docs/maths.md §13.3."""
    torch.manual_seed(1)
    model = small_vgg()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
    dtp, bp, _ = dtp_and_bp_grads(model, x, y)
    torch.testing.assert_close(dtp[-2], bp[-2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dtp[-1], bp[-1], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(dtp[0], bp[0], rtol=1e-3)  # random feedback: earlier layers differ


@pytest.mark.parametrize("beta", [0.7, 5.0])
def test_linear_network_with_transposed_feedback_equals_backprop(beta):
    """docs/maths.md §13.4: linear blocks, V = W^T, any beta."""
    torch.manual_seed(2)
    model = nn.Sequential(
        dtp_ext.Linear(8, 7, beta=beta),
        dtp_ext.Linear(7, 6, beta=beta),
        dtp_ext.Linear(6, 3, beta=beta),
    ).double()
    for _, b in dtp_ext.dtp_blocks(model):
        b.feedback_weight.copy_(b.weight.detach().t())
    x, y = torch.randn(5, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    dtp, bp, _ = dtp_and_bp_grads(model, x, y)
    for a, b in zip(dtp, bp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def gmp_angles(activation, betas):
    torch.manual_seed(3)
    angles = []
    for beta in betas:
        torch.manual_seed(3)
        model = nn.Sequential(
            dtp_ext.Linear(10, 9, activation=activation, beta=beta),
            dtp_ext.Linear(9, 8, activation=activation, beta=beta),
            dtp_ext.Linear(8, 4, beta=beta),
        ).double()
        for _, b in dtp_ext.dtp_blocks(model):
            b.feedback_weight.copy_(b.weight.detach().t())
        x, y = torch.randn(16, 10, dtype=torch.float64), torch.randint(0, 4, (16,))
        dtp, bp, _ = dtp_and_bp_grads(model, x, y)
        angles.append(metrics.angle_degrees(dtp[0], bp[0]))
    return angles


def test_tanh_network_gradient_angle_shrinks_with_beta():
    """docs/maths.md §13.5 with a smooth activation: the first layer's DTP gradient approaches backprop's
    as beta -> 0 up to the plateau left by phi'(phi(a)) != phi'(a), and shrinks monotonically."""
    angles = gmp_angles("tanh", [3.0, 0.3, 0.03])
    assert angles[0] > angles[1] > angles[2]


def test_relu_beta_to_zero_limit_is_backprop_except_dead_units_with_negative_delta():
    """docs/maths.md §13.5 for ReLU, made precise. With V = W^T, (G(s) - G(s - c delta)) / c tends to
    W^T (relu'(z) delta) wherever the unit is alive (s > 0). At a dead unit (s = 0) the difference
    relu(0) - relu(-c delta) is one-sided and scale-free: it passes delta < 0 for every c, where
    backprop passes nothing. So the angle to backprop plateaus instead of vanishing (README)."""
    torch.manual_seed(4)
    block = dtp_ext.Linear(9, 12, activation="relu").double()
    block.feedback_weight.copy_(block.weight.detach().t())
    x = torch.randn(16, 9, dtype=torch.float64)
    s = block(x).detach()
    delta = torch.randn_like(s)
    W = block.weight.detach()
    alive = s > 0
    for beta in (1e-3, 1e-6):
        got = ops.propagate_target(
            s, None, delta, block.feedback_weight, beta * 16, x.shape, block.geometry()
        )
        expected = (delta * (alive | (delta < 0))) @ W
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    backprop = (delta * alive) @ W
    assert metrics.angle_degrees(got, backprop) > 5  # the dead units' share is not rounding error
    assert (~alive & (delta < 0)).any()
