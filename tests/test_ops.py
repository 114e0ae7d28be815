"""The registered ops: dispatcher registration, opcheck, and argument checks in C++."""

import pytest
import torch
import torch.nn.functional as F

import dtp_ext
from conftest import make_block, output_shape
from dtp_ext import ops


def test_every_op_has_a_compiled_cpu_kernel_and_build_info_says_so():
    info = dtp_ext.build_info()
    assert info["cpu_kernels"] == list(ops.OP_NAMES)
    for op in ops.OP_NAMES + ops.PRIVATE_OP_NAMES:
        assert ops.has_kernel(op, "CPU")
    assert info["torch_version"] == torch.__version__
    assert info["cuda_built"] == bool(info["cuda_kernels"])


def sample_args(name="conv-elu-pool2", k=2):
    block, x = make_block(name)
    y_shape = output_shape(block, x)
    s, idx, _ = dtp_ext.reference.forward_block(block, x)
    s = s.detach()
    geo = block.geometry().args()
    w, b = block.weight.detach(), block.bias.detach()
    return block, x, y_shape, s, idx, geo, w, b


@pytest.mark.parametrize("name", ["conv-elu-pool2", "linear-tanh"])
def test_opcheck_every_op(name):
    block, x, y_shape, s, idx, geo, w, b = sample_args(name)
    x = dtp_ext.reference.block_input(block, x)
    fw, fb = block.feedback_weight.clone(), block.feedback_bias.clone()
    nx, ny = torch.randn_like(x) * 0.1, torch.randn(y_shape, dtype=x.dtype) * 0.1
    torch.library.opcheck(torch.ops.dtp_ext.ldrl_loss.default, (x, w, b, fw, nx, ny, *geo))
    torch.library.opcheck(
        torch.ops.dtp_ext.ldrl_feedback_loop.default,
        (
            x,
            w,
            b,
            fw,
            fb,
            torch.zeros_like(fw),
            torch.zeros_like(fb),
            3,
            0.1,
            0.01,
            0.9,
            0.0,
            2,
            torch.stack([nx] * 3),
            torch.stack([ny] * 3),
            *geo,
        ),
    )
    delta = torch.randn(y_shape, dtype=x.dtype)
    torch.library.opcheck(
        torch.ops.dtp_ext.propagate_target.default, (s, idx, delta, fw, 1.4, list(x.shape), *geo)
    )
    torch.library.opcheck(torch.ops.dtp_ext.block_weight_grad.default, (x, s, idx, delta, w, *geo))


def test_cpp_checks_name_op_argument_and_expectation():
    block, x, y_shape, s, idx, geo, w, b = sample_args()
    fw = block.feedback_weight
    nx, ny = torch.zeros_like(x), torch.zeros(y_shape, dtype=x.dtype)
    loss = torch.ops.dtp_ext.ldrl_loss
    with pytest.raises(
        RuntimeError, match=r"dtp_ext.ldrl_loss: noise_y must have shape \[5, 4, 4, 4\]"
    ):
        loss(x, w, b, fw, nx, torch.zeros(5, 4, 8, 8, dtype=x.dtype), *geo)
    with pytest.raises(
        RuntimeError,
        match="dtp_ext.ldrl_loss: x must be float32, float64, bfloat16 or float16, got Int",
    ):
        loss(x.int(), w, b, fw, nx, ny, *geo)
    with pytest.raises(
        RuntimeError, match="dtp_ext.ldrl_loss: feedback_weight must have dtype Double like x"
    ):
        loss(x, w, b, fw.float(), nx, ny, *geo)
    with pytest.raises(RuntimeError, match="dtp_ext.ldrl_loss: x must have 3 channels"):
        loss(x[:, :2], w, b, fw, nx[:, :2], ny, *geo)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        loss(x, w, b, fw, nx, ny, *geo[:4], "gelu", 2)
    with pytest.raises(RuntimeError, match="stride must have 2 entries"):
        loss(x, w, b, fw, nx, ny, [1], *geo[1:])
    loop = torch.ops.dtp_ext.ldrl_feedback_loop
    z = torch.zeros_like(fw), torch.zeros_like(block.feedback_bias)
    for bad, match in [
        ((-1, 0.1, 0.1, 0.9, 0.0, 1), "iterations must be >= 0"),
        ((1, -0.1, 0.1, 0.9, 0.0, 1), "noise_std must be finite and >= 0"),
        ((1, 0.1, float("nan"), 0.9, 0.0, 1), "lr must be finite"),
        ((1, 0.1, 0.1, 1.5, 0.0, 1), r"momentum must be in \[0, 1\)"),
        ((1, 0.1, 0.1, 0.9, 0.0, 0), "chunk_iterations must be >= 1"),
    ]:
        with pytest.raises(RuntimeError, match="dtp_ext.ldrl_feedback_loop: " + match):
            loop(x, w, b, fw.clone(), block.feedback_bias.clone(), *z, *bad, None, None, *geo)
    with pytest.raises(RuntimeError, match=r"noise_x must have shape \[2, 5, 3, 8, 8\]"):
        loop(
            x,
            w,
            b,
            fw.clone(),
            block.feedback_bias.clone(),
            *z,
            2,
            0.1,
            0.1,
            0.9,
            0.0,
            1,
            torch.zeros(1, *x.shape, dtype=x.dtype),
            torch.zeros(2, *y_shape, dtype=x.dtype),
            *geo,
        )
    target = torch.ops.dtp_ext.propagate_target
    with pytest.raises(RuntimeError, match="dtp_ext.propagate_target: output is required"):
        target(None, idx, torch.zeros(y_shape, dtype=x.dtype), fw, 1.0, list(x.shape), *geo)
    with pytest.raises(RuntimeError, match="indices must be given exactly when pool > 1"):
        target(s, None, torch.zeros(y_shape, dtype=x.dtype), fw, 1.0, list(x.shape), *geo)
    with pytest.raises(RuntimeError, match=r"scale \(beta \* batch\) must be finite and > 0"):
        target(s, idx, torch.zeros(y_shape, dtype=x.dtype), fw, 0.0, list(x.shape), *geo)


def test_the_compiled_kernel_is_what_runs():
    """No Python fallback: the op resolves to the C++ kernel registered for CPU."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dtp_ext::ldrl_feedback_loop", "CPU")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(
        "dtp_ext::ldrl_feedback_loop", "CompositeImplicitAutograd"
    )


def private_op_args(pool=2, activation="elu", dtype=torch.float64):
    """Valid arguments of every private elementwise op (torch.ops.dtp_ext._*): a 2x3 map of
    8x8 pre-activations, max-pooled by `pool` (0: no pool)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 8, 8, dtype=dtype, generator=gen)
    if pool:
        s, idx = F.max_pool2d_with_indices(torch.tanh(z), pool, pool)
    else:
        s, idx = torch.tanh(z), None
    noise = torch.randn(s.shape, dtype=dtype, generator=gen)
    weight = torch.randn(4, 3, 3, 3, dtype=dtype, generator=gen)
    pairing = torch.randn(weight.shape, dtype=dtype, generator=gen)
    return {
        "_phi_unpool_difference": [
            "dtp_ext.test",
            s,
            noise,
            0.5,
            idx,
            torch.tanh(s),
            idx,
            list(z.shape),
            pool,
            activation,
            1.5,
            False,
        ],
        "_noisy_difference": [z, torch.tanh(s), idx, activation, pool, False],
        "_sgd_ldrl_update": [
            weight,
            torch.zeros_like(weight),
            pairing,
            pairing * 0.5,
            0.25,
            1e-3,
            0.9,
            0.1,
        ],
        "_activation_pool_backward": [
            "dtp_ext.test",
            s,
            idx,
            noise,
            list(z.shape),
            pool,
            activation,
        ],
    }


@pytest.mark.parametrize("pool", [0, 2])
@pytest.mark.parametrize("op", ops.PRIVATE_OP_NAMES)
def test_opcheck_private_elementwise_ops(op, pool):
    """The elementwise passes are private ops with a CPU kernel and a fake kernel each."""
    assert ops.has_kernel(op, "CPU")
    torch.library.opcheck(getattr(torch.ops.dtp_ext, op).default, tuple(private_op_args(pool)[op]))


def test_window_max_takes_nan_as_the_maximum_like_max_pool2d():
    """ATen's rule (max_pool2d): a NaN anywhere in a window is its maximum (of several, the
    last), and it is what the noisy difference scatters (per-element maths shared with CUDA)."""
    z = torch.tensor(
        [[[[1.0, float("nan"), 3.0, 2.0], [4.0, 0.5, float("nan"), float("nan")]]]],
        dtype=torch.float64,
    )
    _, expected = F.max_pool2d_with_indices(z, 2, 2)
    out = torch.ops.dtp_ext._noisy_difference(z, None, None, "relu", 2, False)
    got = out.flatten(2).isnan().nonzero()[:, 2]
    assert got.tolist() == expected.flatten().tolist() == [1, 7]
    assert (out.flatten().nan_to_num(0) == 0).all()  # the rest of each window stays zero


@pytest.mark.parametrize("size, pool", [(7, 2), (8, 3), (5, 5), (9, 4), (6, 2)])
def test_pooled_activation_backward_equals_max_unpool(size, pool):
    """The window-owning pass (each pooled element writes its window and, for the last window
    of a row or column, the edge no window covers; the same writer as the CUDA kernels) equals
    max_unpool2d of delta * phi'(z), zeros included, on maps that are not multiples of the
    pool."""
    gen = torch.Generator().manual_seed(size * 10 + pool)
    z = torch.randn(3, 4, size, size, dtype=torch.float64, generator=gen)
    s, idx = F.max_pool2d_with_indices(torch.tanh(z), pool, pool)
    delta = torch.randn(s.shape, dtype=torch.float64, generator=gen)
    got = torch.ops.dtp_ext._activation_pool_backward(
        "dtp_ext.test", s, idx, delta, list(z.shape), pool, "tanh"
    )
    expected = F.max_unpool2d(delta * (1 - s * s), idx, pool, pool, output_size=z.shape[2:])
    assert torch.equal(got, expected)
