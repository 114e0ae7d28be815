"""Fake (meta) kernels of the compiled ops, for torch.compile, FakeTensor and opcheck.

How far they go, decided on purpose: everything torch.compile needs (each output's sizes,
strides, dtype and device) and every check the compiled kernels make without reading data
(geometry, shapes, dtypes, devices, the scalar arguments' ranges), with the same messages. A
call that the compiled op refuses is then refused when torch.compile traces it, with the
compiled op's message, instead of tracing a graph with wrong shapes that fails later, in
another op, or only when it runs. The checks that need data live in C++ only: non-finite
inputs (csrc/common/finite_check.cpp), pool indices outside their windows, memory shared
between a loop's in-place state and its other arguments, allocations that fail.

The data-free checks are written twice (csrc/common/block_geometry.cpp and
csrc/ops/block_ops.cpp, and here, check for check); tests/ops/test_fake_kernels.py runs one table
of bad arguments through both and requires the same refusal. The argument lists are not written
here: each kernel takes the op's arguments as they come (*args) and reads them by name from the
op's schema (_signatures.py). Every output is contiguous, as the compiled kernels return it.
Sizes may be symbolic (torch.compile with dynamic shapes): only arithmetic and comparisons on
them are used here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from . import _signatures

ACTIVATIONS = ("none", "identity", "relu", "elu", "tanh")
# c10's names for dtypes, as the C++ messages print them.
_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
}


def _dtype(t: torch.Tensor) -> str:
    return _DTYPE_NAMES.get(t.dtype, str(t.dtype))


def _check(ok, op: str, *message):
    if not ok:
        raise RuntimeError(f"{op}: " + "".join(str(m) for m in message))


@dataclass
class Geometry:
    is_conv: bool
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    activation: str
    pool: int


def _pair(op, name, values, minimum):
    values = list(values)
    _check(len(values) == 2, op, name, " must have 2 entries for a conv block, got ", len(values))
    for v in values:
        _check(v >= minimum, op, name, " entries must be >= ", minimum, ", got ", values)
    return values


def parse_geometry(op, weight, a: SimpleNamespace) -> Geometry:
    """The geometry arguments of a call (`a`, by name) for a block of forward weight `weight`."""
    stride, padding, dilation, groups = a.stride, a.padding, a.dilation, a.groups
    activation, pool = a.activation, a.pool
    _check(
        weight.dim() in (2, 4),
        op,
        "weight must be 2-D (linear, out x in) or 4-D (conv, Cout x Cin/groups x kH x kW), got ",
        weight.dim(),
        "-D",
    )
    is_conv = weight.dim() == 4
    _check(
        activation in ACTIVATIONS,
        op,
        "activation must be one of 'none', 'relu', 'elu', 'tanh', got '",
        activation,
        "'",
    )
    _check(pool >= 0, op, "pool must be 0 (none) or a kernel size >= 1, got ", pool)
    g = Geometry(is_conv, [], [], [], 1, activation, 0 if pool <= 1 else pool)
    if is_conv:
        g.stride = _pair(op, "stride", stride, 1)
        g.padding = _pair(op, "padding", padding, 0)
        g.dilation = _pair(op, "dilation", dilation, 1)
        _check(
            groups >= 1 and weight.shape[0] % groups == 0,
            op,
            "groups must be >= 1 and divide the output channels (",
            weight.shape[0],
            "), got ",
            groups,
        )
        g.groups = groups
    else:
        _check(g.pool == 0, op, "pool is only defined for conv blocks, got pool=", pool)
    return g


def pre_pool_sizes(g: Geometry, input_sizes, weight) -> list:
    if not g.is_conv:
        return [input_sizes[0], weight.shape[0]]
    return [input_sizes[0], weight.shape[0]] + [
        (input_sizes[2 + d] + 2 * g.padding[d] - g.dilation[d] * (weight.shape[2 + d] - 1) - 1)
        // g.stride[d]
        + 1
        for d in range(2)
    ]


def block_output_sizes(g: Geometry, input_sizes, weight) -> list:
    sizes = pre_pool_sizes(g, input_sizes, weight)
    if g.pool:
        sizes[2], sizes[3] = sizes[2] // g.pool, sizes[3] // g.pool
    return sizes


def check_map_sizes(op, g: Geometry, input_sizes, weight):
    if not g.is_conv:
        return
    pre = pre_pool_sizes(g, input_sizes, weight)
    _check(
        pre[2] >= 1 and pre[3] >= 1,
        op,
        "the conv's output map would be empty: input ",
        input_sizes[2],
        "x",
        input_sizes[3],
        " with kernel ",
        weight.shape[2],
        "x",
        weight.shape[3],
        ", padding ",
        g.padding,
        ", dilation ",
        g.dilation,
        " and stride ",
        g.stride,
    )
    _check(
        g.pool == 0 or (pre[2] >= g.pool and pre[3] >= g.pool),
        op,
        "the pool (",
        g.pool,
        "x",
        g.pool,
        ") is larger than the conv's output map (",
        pre[2],
        "x",
        pre[3],
        ")",
    )


def check_same_device_dtype(op, name, t, like):
    _check(
        t.device == like.device, op, name, " must be on ", like.device, " like x, got ", t.device
    )
    _check(
        t.dtype == like.dtype,
        op,
        name,
        " must have dtype ",
        _dtype(like),
        " like x, got ",
        _dtype(t),
    )


def check_shape(op, name, t, expected):
    _check(
        list(t.shape) == list(expected),
        op,
        name,
        " must have shape ",
        list(expected),
        ", got ",
        list(t.shape),
    )


FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REDUCED_DTYPES = (torch.bfloat16, torch.float16)


def loss_dtype(x):
    """Losses are reductions: float32 when x is bfloat16/float16, else x's dtype."""
    return torch.float32 if x.dtype in REDUCED_DTYPES else x.dtype


def check_block_tensors(op, g: Geometry, x, weight, bias):
    _check(
        x.dtype in FLOAT_DTYPES,
        op,
        "x must be float32, float64, bfloat16 or float16, got ",
        _dtype(x),
    )
    check_same_device_dtype(op, "weight", weight, x)
    if bias is not None:
        check_same_device_dtype(op, "bias", bias, x)
        _check(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            op,
            "bias must have shape [",
            weight.shape[0],
            "], got ",
            list(bias.shape),
        )
    if g.is_conv:
        _check(x.dim() == 4, op, "x must be 4-D (N, C, H, W) for a conv block, got ", x.dim(), "-D")
        _check(
            x.shape[1] == weight.shape[1] * g.groups,
            op,
            "x must have ",
            weight.shape[1] * g.groups,
            " channels (weight.size(1) * groups), got ",
            x.shape[1],
        )
    else:
        _check(
            x.dim() == 2,
            op,
            "x must be 2-D (batch, in_features) for a linear block, got ",
            x.dim(),
            "-D",
        )
        _check(
            x.shape[1] == weight.shape[1],
            op,
            "x must have ",
            weight.shape[1],
            " features (weight.size(1)), got ",
            x.shape[1],
        )
    _check(x.shape[0] > 0, op, "x must hold at least one sample, got an empty batch")
    check_map_sizes(op, g, x.shape, weight)


def check_feedback_weight(op, g: Geometry, weight, feedback_weight, x, allow_master=False):
    if allow_master and x.dtype in REDUCED_DTYPES:
        _check(
            feedback_weight.device == x.device,
            op,
            "feedback_weight must be on ",
            x.device,
            " like x, got ",
            feedback_weight.device,
        )
        _check(
            feedback_weight.dtype in (x.dtype, torch.float32),
            op,
            "feedback_weight must have dtype ",
            _dtype(x),
            " like x or Float (a float32 master copy), got ",
            _dtype(feedback_weight),
        )
    else:
        check_same_device_dtype(op, "feedback_weight", feedback_weight, x)
    expected = list(weight.shape) if g.is_conv else [weight.shape[1], weight.shape[0]]
    _check(
        list(feedback_weight.shape) == expected,
        op,
        "feedback_weight must have shape ",
        expected,
        " for this block, got ",
        list(feedback_weight.shape),
    )


def check_state(op, name, t, x, feedback_weight):
    """The loops' state has the feedback weight's dtype (x's, or float32 masters)."""
    if feedback_weight.dtype == x.dtype:
        check_same_device_dtype(op, name, t, x)
        return
    _check(t.device == x.device, op, name, " must be on ", x.device, " like x, got ", t.device)
    _check(
        t.dtype == feedback_weight.dtype,
        op,
        name,
        " must have dtype ",
        _dtype(feedback_weight),
        " like feedback_weight (a float32 master copy), got ",
        _dtype(t),
    )


def check_noise(op, name, noise, expected, x):
    check_same_device_dtype(op, name, noise, x)
    check_shape(op, name, noise, expected)


def check_stored_output(op, g: Geometry, output, indices, delta, expected):
    check_shape(op, "delta", delta, expected)
    _check(
        output is not None or (g.activation in ("none", "identity") and g.pool == 0),
        op,
        "output is required for a block with an activation or a pool",
    )
    if output is not None:
        check_same_device_dtype(op, "output", output, delta)
        check_shape(op, "output", output, expected)
    _check((indices is not None) == (g.pool > 0), op, "indices must be given exactly when pool > 1")
    if indices is not None:
        _check(
            indices.dtype == torch.int64 and indices.device == delta.device,
            op,
            "indices must be int64 on ",
            delta.device,
            ", got ",
            _dtype(indices),
            " on ",
            indices.device,
        )
        check_shape(op, "indices", indices, expected)


# -- the ops: each takes its op's name ("dtp_ext.<op>") and arguments by name -----------------
def _ldrl_loss(op, a):
    x, weight, feedback_weight = a.x, a.weight, a.feedback_weight
    g = parse_geometry(op, weight, a)
    check_block_tensors(op, g, x, weight, a.bias)
    check_feedback_weight(op, g, weight, feedback_weight, x)
    check_noise(op, "noise_x", a.noise_x, x.shape, x)
    check_noise(op, "noise_y", a.noise_y, block_output_sizes(g, x.shape, weight), x)
    return (
        x.new_empty((), dtype=loss_dtype(x)),
        feedback_weight.new_empty(feedback_weight.shape),
        x.new_empty((x.shape[1],)),
    )


def _feedback_loop(op, a):
    """Both loops: ldrl_feedback_loop draws eta (it has noise_y), reconstruction's does not."""
    x, weight, feedback_weight, iterations = a.x, a.weight, a.feedback_weight, a.iterations
    draws_eta = hasattr(a, "noise_y")
    noise_y = a.noise_y if draws_eta else None
    g = parse_geometry(op, weight, a)
    check_block_tensors(op, g, x, weight, a.bias)
    check_feedback_weight(op, g, weight, feedback_weight, x, allow_master=True)
    _check(iterations >= 0, op, "iterations must be >= 0, got ", iterations)
    _check(
        a.noise_std >= 0 and abs(a.noise_std) != float("inf"),
        op,
        "noise_std must be finite and >= 0, got ",
        a.noise_std,
    )
    _check(a.lr >= 0 and a.lr != float("inf"), op, "lr must be finite and >= 0, got ", a.lr)
    _check(0 <= a.momentum < 1, op, "momentum must be in [0, 1), got ", a.momentum)
    _check(
        a.weight_decay >= 0 and a.weight_decay != float("inf"),
        op,
        "weight_decay must be finite and >= 0, got ",
        a.weight_decay,
    )
    _check(a.chunk_iterations >= 1, op, "chunk_iterations must be >= 1, got ", a.chunk_iterations)
    for name, shape in (
        ("feedback_bias", [x.shape[1]]),
        ("momentum_weight", feedback_weight.shape),
        ("momentum_bias", [x.shape[1]]),
    ):
        check_state(op, name, getattr(a, name), x, feedback_weight)
        check_shape(op, name, getattr(a, name), shape)
    if a.noise_x is not None:
        check_noise(op, "noise_x", a.noise_x, [iterations, *x.shape], x)
    if noise_y is not None:
        check_noise(
            op, "noise_y", noise_y, [iterations, *block_output_sizes(g, x.shape, weight)], x
        )
    _check(
        not draws_eta or (a.noise_x is None) == (noise_y is None),
        op,
        "noise_x and noise_y must be given together or not at all",
    )
    return x.new_empty((iterations,), dtype=loss_dtype(x))


def _propagate_target(op, a):
    delta, feedback_weight, input_sizes = a.delta, a.feedback_weight, a.input_sizes
    g = parse_geometry(op, feedback_weight, a)
    _check(
        delta.dtype in FLOAT_DTYPES,
        op,
        "delta must be float32, float64, bfloat16 or float16, got ",
        _dtype(delta),
    )
    _check(
        a.scale > 0 and a.scale != float("inf"),
        op,
        "scale (beta * batch) must be finite and > 0, got ",
        a.scale,
    )
    _check(
        len(input_sizes) == (4 if g.is_conv else 2),
        op,
        "input_sizes must have ",
        4 if g.is_conv else 2,
        " entries, got ",
        list(input_sizes),
    )
    check_same_device_dtype(op, "feedback_weight", feedback_weight, delta)
    forward_shaped = feedback_weight if g.is_conv else feedback_weight.t()
    in_channels = forward_shaped.shape[1] * (g.groups if g.is_conv else 1)
    _check(
        input_sizes[0] > 0 and input_sizes[1] == in_channels,
        op,
        "input_sizes must describe a non-empty input with ",
        in_channels,
        " channels" if g.is_conv else " features",
        " (what feedback_weight maps to), got ",
        list(input_sizes),
    )
    check_map_sizes(op, g, input_sizes, forward_shaped)
    check_stored_output(
        op, g, a.output, a.indices, delta, block_output_sizes(g, input_sizes, forward_shaped)
    )
    return delta.new_empty(input_sizes)


def _block_weight_grad(op, a):
    x, weight = a.x, a.weight
    g = parse_geometry(op, weight, a)
    check_block_tensors(op, g, x, weight, None)
    check_same_device_dtype(op, "delta", a.delta, x)
    check_stored_output(op, g, a.output, a.indices, a.delta, block_output_sizes(g, x.shape, weight))
    return weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


# -- the private elementwise passes (torch.ops.dtp_ext._*), which the ops above call from C++ ---
def _pass_format(channels_last, pooled):
    """A pooled pass writes its output in the layout the caller asks for (channels-last: the
    CPU's choice for large maps); an unpooled one is elementwise and keeps its input's."""
    return torch.channels_last if channels_last and pooled else torch.contiguous_format


def _phi_unpool_difference(op, a):
    return torch.empty(
        a.out_sizes,
        dtype=a.a.dtype,
        device=a.a.device,
        memory_format=_pass_format(a.channels_last, a.a_indices is not None),
    )


def _noisy_difference(op, a):
    return torch.empty(
        a.z_noisy.shape,
        dtype=a.z_noisy.dtype,
        device=a.z_noisy.device,
        memory_format=_pass_format(a.channels_last, a.pool > 1),
    )


def _sgd_momentum_update(op, a):
    # <weight, noise_pairing> before the step: a reduction, float32 for a low-precision weight.
    return a.weight.new_empty((), dtype=loss_dtype(a.weight))


def _activation_pool_backward(op, a):
    return a.output.new_empty(a.out_sizes)


def _kernel(name: str, body: Callable) -> Callable:
    """The fake kernel of torch.ops.dtp_ext.<name>: its arguments as the dispatcher passes them,
    bound to the schema's names for `body`."""

    def kernel(*args, **kwargs):
        return body(f"dtp_ext.{name}", _signatures.bind(name, args, kwargs))

    kernel.__name__ = kernel.__qualname__ = name
    return kernel


# Every compiled op's fake kernel, by op name (ops.py registers them).
KERNELS = {
    name: _kernel(name, body)
    for name, body in {
        "ldrl_loss": _ldrl_loss,
        "ldrl_feedback_loop": _feedback_loop,
        "reconstruction_feedback_loop": _feedback_loop,
        "propagate_target": _propagate_target,
        "block_weight_grad": _block_weight_grad,
        "_phi_unpool_difference": _phi_unpool_difference,
        "_noisy_difference": _noisy_difference,
        "_sgd_momentum_update": _sgd_momentum_update,
        "_activation_pool_backward": _activation_pool_backward,
    }.items()
}
