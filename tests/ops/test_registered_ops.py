"""The registered ops: dispatcher registration, opcheck, and argument checks in C++."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import dtp_ext
from dtp_ext import _signatures, ops
from tests.helpers.blocks import make_block, pooled_block
from tests.helpers.cuda import DEVICES, require_device
from tests.helpers.op_args import block_op_args, private_op_args


def test_every_op_has_a_compiled_cpu_kernel_and_build_info_says_so():
    info = dtp_ext.build_info()
    assert info["cpu_kernels"] == list(ops.OP_NAMES)
    for op in ops.OP_NAMES + ops.PRIVATE_OP_NAMES:
        assert ops.has_kernel(op, "CPU")
    assert info["torch_version"] == torch.__version__
    assert info["cuda_built"] == bool(info["cuda_kernels"])


@pytest.mark.parametrize("name", ["conv-elu-pool2", "linear-tanh"])
@pytest.mark.parametrize("op", ops.OP_NAMES)
def test_opcheck_every_op(name, op):
    torch.library.opcheck(
        getattr(torch.ops.dtp_ext, op).default, block_op_args(name)[op].positional()
    )


def test_each_wrapper_passes_its_ops_arguments_by_name():
    """ops.<op>(..., geometry, ...) takes the schema's arguments, the geometry as one
    BlockGeometry, and gives the op what a direct call with the same values gives."""
    for op in ops.OP_NAMES:
        params = list(inspect.signature(getattr(ops, op)).parameters)
        schema = [n for n in _signatures.names(op) if n not in _signatures.GEOMETRY]
        assert sorted(params) == sorted([*schema, "geometry"]), op
    args = block_op_args("conv-elu-pool2")["propagate_target"]
    block, _ = make_block("conv-elu-pool2")
    wrapped = ops.propagate_target(
        geometry=block.geometry(),
        **{n: v for n, v in args.values.items() if n not in _signatures.GEOMETRY},
    )
    assert torch.equal(wrapped, args.call())
    assert ops.LdrlLoss._fields == tuple(
        r.name for r in torch.ops.dtp_ext.ldrl_loss.default._schema.returns
    )


def test_cpp_checks_name_op_argument_and_expectation():
    every = block_op_args("conv-elu-pool2")
    loss = every["ldrl_loss"]
    x, nx = loss["x"], loss["noise_x"]
    with pytest.raises(
        RuntimeError, match=r"dtp_ext.ldrl_loss: noise_y must have shape \[5, 4, 4, 4\]"
    ):
        loss.replace(noise_y=torch.zeros(5, 4, 8, 8, dtype=x.dtype)).call()
    with pytest.raises(
        RuntimeError,
        match="dtp_ext.ldrl_loss: x must be float32, float64, bfloat16 or float16, got Int",
    ):
        loss.replace(x=x.int()).call()
    with pytest.raises(
        RuntimeError, match="dtp_ext.ldrl_loss: feedback_weight must have dtype Double like x"
    ):
        loss.replace(feedback_weight=loss["feedback_weight"].float()).call()
    with pytest.raises(RuntimeError, match="dtp_ext.ldrl_loss: x must have 3 channels"):
        loss.replace(x=x[:, :2], noise_x=nx[:, :2]).call()
    with pytest.raises(RuntimeError, match="activation must be one of"):
        loss.replace(activation="gelu").call()
    with pytest.raises(RuntimeError, match="stride must have 2 entries"):
        loss.replace(stride=[1]).call()
    loop = every["ldrl_feedback_loop"].replace(noise_x=None, noise_y=None)
    for bad, match in [
        (dict(iterations=-1), "iterations must be >= 0"),
        (dict(noise_std=-0.1), "noise_std must be finite and >= 0"),
        (dict(lr=float("nan")), "lr must be finite"),
        (dict(momentum=1.5), r"momentum must be in \[0, 1\)"),
        (dict(chunk_iterations=0), "chunk_iterations must be >= 1"),
    ]:
        with pytest.raises(RuntimeError, match="dtp_ext.ldrl_feedback_loop: " + match):
            loop.replace(**bad).clone().call()
    y_shape = loss["noise_y"].shape
    with pytest.raises(RuntimeError, match=r"noise_x must have shape \[2, 5, 3, 8, 8\]"):
        loop.replace(
            iterations=2,
            chunk_iterations=1,
            noise_x=torch.zeros(1, *x.shape, dtype=x.dtype),
            noise_y=torch.zeros(2, *y_shape, dtype=x.dtype),
        ).clone().call()
    target = every["propagate_target"].replace(delta=torch.zeros(y_shape, dtype=x.dtype))
    with pytest.raises(RuntimeError, match="dtp_ext.propagate_target: output is required"):
        target.replace(output=None).call()
    with pytest.raises(RuntimeError, match="indices must be given exactly when pool > 1"):
        target.replace(indices=None).call()
    with pytest.raises(RuntimeError, match=r"scale \(beta \* batch\) must be finite and > 0"):
        target.replace(scale=0.0).call()


def test_the_compiled_kernel_is_what_runs():
    """No Python fallback: the op resolves to the C++ kernel registered for CPU."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dtp_ext::ldrl_feedback_loop", "CPU")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(
        "dtp_ext::ldrl_feedback_loop", "CompositeImplicitAutograd"
    )


@pytest.mark.parametrize("pool", [0, 2])
@pytest.mark.parametrize("op", ops.PRIVATE_OP_NAMES)
def test_opcheck_private_elementwise_ops(op, pool):
    """The elementwise passes are private ops with a CPU kernel and a fake kernel each."""
    assert ops.has_kernel(op, "CPU")
    torch.library.opcheck(
        getattr(torch.ops.dtp_ext, op).default, private_op_args(pool)[op].positional()
    )


@pytest.mark.parametrize("device", DEVICES)
def test_window_max_takes_nan_as_the_maximum_like_max_pool2d(device):
    """ATen's rule (max_pool2d): a NaN anywhere in a window is its maximum (of several, the
    last), and it is what the noisy difference scatters (per-element maths shared by the CPU
    and CUDA kernels)."""
    require_device(device)
    z = torch.tensor(
        [[[[1.0, float("nan"), 3.0, 2.0], [4.0, 0.5, float("nan"), float("nan")]]]],
        dtype=torch.float64,
    )
    _, expected = F.max_pool2d_with_indices(z, 2, 2)
    out = torch.ops.dtp_ext._noisy_difference(z.to(device), None, None, "relu", 2, False).cpu()
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


def test_report_names_the_kernel_that_ran():
    b, x, out, idx = pooled_block()
    ops.propagate_target(
        out, idx, torch.randn_like(out), b.feedback_weight, 1.4, x.shape, b.geometry()
    )
    assert ops.last_kernel() == "dtp_ext::propagate_target[CPU]"
    ops.block_weight_grad(x, out, idx, torch.randn_like(out), b.weight, b.geometry())
    assert ops.last_kernel() == "dtp_ext::block_weight_grad[CPU]"
