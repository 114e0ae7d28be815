"""Property-based tests (hypothesis): over random block geometries, batch sizes, memory
layouts, dtypes and hyperparameters, every fused op equals the pure-PyTorch autograd reference
with the same noise.

The default profile (tests/conftest.py) is derandomized (the same examples on every run, so CI cannot flake);
`pytest tests/ops/test_random_geometries.py --hypothesis-profile=thorough` searches 500 random examples.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dtp_ext
from dtp_ext import functional, ops, reference

ACTIVATIONS = [None, "relu", "elu", "tanh"]


def _out(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@st.composite
def blocks(draw):
    """(block, x) with x in float64; conv geometry may be non-square, strided, grouped."""
    batch = draw(st.integers(1, 4))
    activation = draw(st.sampled_from(ACTIVATIONS))
    bias = draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if draw(st.booleans()):
        block = dtp_ext.Linear(
            draw(st.integers(1, 6)), draw(st.integers(1, 6)), bias=bias, activation=activation
        )
        return block.double(), torch.randn(batch, block.in_features, dtype=torch.float64)
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 1)), draw(st.integers(0, 1)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pool = draw(st.sampled_from([None, 2, 3]))
    # Input sizes for which the conv (and the pool, if any) has at least one output.
    smallest = [
        max(
            1,
            next(
                s
                for s in range(1, 40)
                if _out(s, kernel[i], stride[i], padding[i], dilation[i]) >= (pool or 1)
            ),
        )
        for i in range(2)
    ]
    h = draw(st.integers(smallest[0], smallest[0] + 6))
    w = draw(st.integers(smallest[1], smallest[1] + 6))
    block = dtp_ext.Conv2d(
        cin,
        cout,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        activation=activation,
        pool=pool,
    ).double()
    return block, torch.randn(batch, cin, h, w, dtype=torch.float64)


def layouts(t, channels_last):
    """The same values in a non-contiguous layout (channels-last for 4-D, transposed for 2-D)."""
    if not channels_last:
        return t
    return t.to(memory_format=torch.channels_last) if t.dim() == 4 else t.t().contiguous().t()


def noise(block, x, sigma, k=None):
    xin = reference.block_input(block, x)
    y_shape = reference.forward_block(block, xin)[0].shape
    lead = () if k is None else (k,)
    return (
        torch.randn(*lead, *xin.shape, dtype=x.dtype) * sigma,
        torch.randn(*lead, *y_shape, dtype=x.dtype) * sigma,
    )


@given(blocks(), st.floats(0.0, 1.0), st.booleans())
def test_ldrl_loss_equals_reference(block_x, sigma, strided):
    block, x = block_x
    nx, ny = noise(block, x, sigma)
    loss, grad_v, grad_c = functional.ldrl_loss(
        block, layouts(x, strided), layouts(nx, strided), layouts(ny, strided)
    )
    ref_loss, ref_v, _ = reference.ldrl_loss_and_grads(block, x, nx, ny)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad_v, ref_v, rtol=1e-9, atol=1e-10)
    assert torch.count_nonzero(grad_c) == 0


@given(
    blocks(),
    st.integers(0, 3),
    st.integers(1, 3),
    st.floats(0.0, 0.5),
    st.floats(0.0, 0.1),
    st.floats(0.0, 0.95),
    st.sampled_from([0.0, 1e-3, 0.1]),
)
def test_ldrl_feedback_loop_equals_reference_sgd(block_x, k, chunk, sigma, lr, momentum, wd):
    block, x = block_x
    nx, ny = noise(block, x, sigma, k)
    ref_v, ref_c, ref_losses, _ = reference.feedback_loop(
        block, x, k, sigma, lr, momentum, wd, nx, ny
    )
    fw, fb = block.feedback_weight.clone(), block.feedback_bias.clone()
    losses = ops.ldrl_feedback_loop(
        reference.block_input(block, x),
        block.weight.detach(),
        None if block.bias is None else block.bias.detach(),
        fw,
        fb,
        torch.zeros_like(fw),
        torch.zeros_like(fb),
        k,
        sigma,
        lr,
        momentum,
        wd,
        chunk,
        block.geometry(),
        nx,
        ny,
    )
    torch.testing.assert_close(losses, ref_losses, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(fw, ref_v, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(fb, ref_c, rtol=1e-9, atol=1e-10)


@given(
    blocks(),
    st.integers(0, 3),
    st.integers(1, 3),
    st.floats(0.0, 0.5),
    st.floats(0.0, 0.05),
    st.floats(0.0, 0.95),
    st.sampled_from([0.0, 1e-3, 0.1]),
)
def test_reconstruction_feedback_loop_equals_reference_sgd(
    block_x, k, chunk, sigma, lr, momentum, wd
):
    """Vanilla DTP's loop (docs/maths.md §10) against torch.optim.SGD on the autograd reconstruction loss."""
    block, x = block_x
    xin = reference.block_input(block, x)
    nx = torch.randn(k, *xin.shape, dtype=x.dtype) * sigma
    V, c, ref_losses, _ = reference.feedback_loop(
        block, xin, k, sigma, lr, momentum, wd, nx, loss="reconstruction"
    )
    fw, fb = block.feedback_weight.clone(), block.feedback_bias.clone()
    losses = ops.reconstruction_feedback_loop(
        xin,
        block.weight.detach(),
        None if block.bias is None else block.bias.detach(),
        fw,
        fb,
        torch.zeros_like(fw),
        torch.zeros_like(fb),
        k,
        sigma,
        lr,
        momentum,
        wd,
        chunk,
        block.geometry(),
        nx,
    )
    torch.testing.assert_close(losses, ref_losses, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(fw, V, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(fb, c, rtol=1e-9, atol=1e-10)


@given(blocks(), st.floats(0.05, 5.0), st.booleans())
def test_propagate_target_and_weight_grad_equal_reference(block_x, beta, strided):
    block, x = block_x
    xin = reference.block_input(block, x)
    s, idx, pre = reference.forward_block(block, xin)
    delta = torch.randn(s.shape, dtype=x.dtype)
    stored = s.detach() if block.activation or block.pool else None
    scale = beta * xin.shape[0]
    got = ops.propagate_target(
        stored,
        idx,
        layouts(delta, strided),
        block.feedback_weight,
        scale,
        xin.shape,
        block.geometry(),
    )
    g_s = reference.feedback_block(block, s.detach(), idx, pre, xin.shape)
    g_t = reference.feedback_block(block, s.detach() - scale * delta, idx, pre, xin.shape)
    torch.testing.assert_close(got, (g_s - g_t) / scale, rtol=1e-9, atol=1e-10)

    params = [block.weight] + ([block.bias] if block.bias is not None else [])
    expected = torch.autograd.grad(s, params, delta)
    gw, gb = ops.block_weight_grad(
        layouts(xin, strided), stored, idx, delta, block.weight.detach(), block.geometry()
    )
    torch.testing.assert_close(gw, expected[0], rtol=1e-9, atol=1e-10)
    if block.bias is not None:
        torch.testing.assert_close(gb, expected[1], rtol=1e-9, atol=1e-10)


@given(blocks(), st.floats(0.01, 0.5))
def test_float32_kernels_track_float64(block_x, sigma):
    block, x = block_x
    nx, ny = noise(block, x, sigma)
    loss64, grad64, _ = functional.ldrl_loss(block, x, nx, ny)
    block32 = block.float()
    loss32, grad32, _ = functional.ldrl_loss(block32, x.float(), nx.float(), ny.float())
    assert loss32.dtype == grad32.dtype == torch.float32
    scale = 1.0 + float(grad64.abs().max())
    torch.testing.assert_close(
        loss32.double(), loss64, rtol=1e-4, atol=1e-4 * (1 + float(loss64.abs()))
    )
    torch.testing.assert_close(grad32.double(), grad64, rtol=1e-4, atol=1e-4 * scale)


@given(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 3),
    st.integers(-1, 3),
)
def test_feedback_loop_hyperparameters_are_accepted_exactly_when_valid(
    sigma, lr, momentum, k, chunk
):
    block = dtp_ext.Linear(3, 2, activation="elu").double()
    x = torch.randn(2, 3, dtype=torch.float64)
    fw, fb = block.feedback_weight.clone(), block.feedback_bias.clone()
    valid = (
        k >= 0
        and chunk >= 1
        and sigma == sigma
        and 0 <= sigma < float("inf")
        and lr == lr
        and 0 <= lr < float("inf")
        and momentum == momentum
        and 0 <= momentum < 1
    )
    call = lambda: ops.ldrl_feedback_loop(
        x,
        block.weight.detach(),
        block.bias.detach(),
        fw,
        fb,  # noqa: E731
        torch.zeros_like(fw),
        torch.zeros_like(fb),
        k,
        sigma,
        lr,
        momentum,
        0.0,
        chunk,
        block.geometry(),
    )
    if valid:
        call()
    else:
        with pytest.raises(
            RuntimeError,
            match="dtp_ext.ldrl_feedback_loop: (iterations|noise_std|lr|momentum|chunk_iterations)",
        ):
            call()
