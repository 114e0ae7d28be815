"""Fake (meta) kernels of the compiled ops: output sizes and strides, and the argument checks
that need no data, for torch.compile, FakeTensor and opcheck.

They mirror csrc/common/block_geometry.cpp and csrc/ops/block_ops.cpp check for check, with the
same messages; tests/test_fake_kernels.py runs one table of bad arguments through both and
requires the same refusal. Every output is contiguous, as the compiled kernels return it.
Sizes may be symbolic (torch.compile with dynamic shapes): only arithmetic and comparisons on
them are used here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def parse_geometry(op, weight, stride, padding, dilation, groups, activation, pool) -> Geometry:
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


# -- the ops ------------------------------------------------------------------------------
def ldrl_loss(
    x,
    weight,
    bias,
    feedback_weight,
    noise_x,
    noise_y,
    stride,
    padding,
    dilation,
    groups,
    activation,
    pool,
):
    op = "dtp_ext.ldrl_loss"
    g = parse_geometry(op, weight, stride, padding, dilation, groups, activation, pool)
    check_block_tensors(op, g, x, weight, bias)
    check_feedback_weight(op, g, weight, feedback_weight, x)
    check_noise(op, "noise_x", noise_x, x.shape, x)
    check_noise(op, "noise_y", noise_y, block_output_sizes(g, x.shape, weight), x)
    return (
        x.new_empty((), dtype=loss_dtype(x)),
        feedback_weight.new_empty(feedback_weight.shape),
        x.new_empty((x.shape[1],)),
    )


def _feedback_loop(
    op,
    draws_eta,
    x,
    weight,
    bias,
    feedback_weight,
    feedback_bias,
    momentum_weight,
    momentum_bias,
    iterations,
    noise_std,
    lr,
    momentum,
    weight_decay,
    chunk_iterations,
    noise_x,
    noise_y,
    stride,
    padding,
    dilation,
    groups,
    activation,
    pool,
):
    g = parse_geometry(op, weight, stride, padding, dilation, groups, activation, pool)
    check_block_tensors(op, g, x, weight, bias)
    check_feedback_weight(op, g, weight, feedback_weight, x, allow_master=True)
    _check(iterations >= 0, op, "iterations must be >= 0, got ", iterations)
    _check(
        noise_std >= 0 and abs(noise_std) != float("inf"),
        op,
        "noise_std must be finite and >= 0, got ",
        noise_std,
    )
    _check(lr >= 0 and lr != float("inf"), op, "lr must be finite and >= 0, got ", lr)
    _check(0 <= momentum < 1, op, "momentum must be in [0, 1), got ", momentum)
    _check(
        weight_decay >= 0 and weight_decay != float("inf"),
        op,
        "weight_decay must be finite and >= 0, got ",
        weight_decay,
    )
    _check(chunk_iterations >= 1, op, "chunk_iterations must be >= 1, got ", chunk_iterations)
    for name, t, shape in (
        ("feedback_bias", feedback_bias, [x.shape[1]]),
        ("momentum_weight", momentum_weight, feedback_weight.shape),
        ("momentum_bias", momentum_bias, [x.shape[1]]),
    ):
        check_state(op, name, t, x, feedback_weight)
        check_shape(op, name, t, shape)
    if noise_x is not None:
        check_noise(op, "noise_x", noise_x, [iterations, *x.shape], x)
    if noise_y is not None:
        check_noise(
            op, "noise_y", noise_y, [iterations, *block_output_sizes(g, x.shape, weight)], x
        )
    _check(
        not draws_eta or (noise_x is None) == (noise_y is None),
        op,
        "noise_x and noise_y must be given together or not at all",
    )
    return x.new_empty((iterations,), dtype=loss_dtype(x))


def ldrl_feedback_loop(
    x,
    weight,
    bias,
    feedback_weight,
    feedback_bias,
    momentum_weight,
    momentum_bias,
    iterations,
    noise_std,
    lr,
    momentum,
    weight_decay,
    chunk_iterations,
    noise_x,
    noise_y,
    stride,
    padding,
    dilation,
    groups,
    activation,
    pool,
):
    return _feedback_loop(
        "dtp_ext.ldrl_feedback_loop",
        True,
        x,
        weight,
        bias,
        feedback_weight,
        feedback_bias,
        momentum_weight,
        momentum_bias,
        iterations,
        noise_std,
        lr,
        momentum,
        weight_decay,
        chunk_iterations,
        noise_x,
        noise_y,
        stride,
        padding,
        dilation,
        groups,
        activation,
        pool,
    )


def reconstruction_feedback_loop(
    x,
    weight,
    bias,
    feedback_weight,
    feedback_bias,
    momentum_weight,
    momentum_bias,
    iterations,
    noise_std,
    lr,
    momentum,
    weight_decay,
    chunk_iterations,
    noise_x,
    stride,
    padding,
    dilation,
    groups,
    activation,
    pool,
):
    return _feedback_loop(
        "dtp_ext.reconstruction_feedback_loop",
        False,
        x,
        weight,
        bias,
        feedback_weight,
        feedback_bias,
        momentum_weight,
        momentum_bias,
        iterations,
        noise_std,
        lr,
        momentum,
        weight_decay,
        chunk_iterations,
        noise_x,
        None,
        stride,
        padding,
        dilation,
        groups,
        activation,
        pool,
    )


def propagate_target(
    output,
    indices,
    delta,
    feedback_weight,
    scale,
    input_sizes,
    stride,
    padding,
    dilation,
    groups,
    activation,
    pool,
):
    op = "dtp_ext.propagate_target"
    g = parse_geometry(op, feedback_weight, stride, padding, dilation, groups, activation, pool)
    _check(
        delta.dtype in FLOAT_DTYPES,
        op,
        "delta must be float32, float64, bfloat16 or float16, got ",
        _dtype(delta),
    )
    _check(
        scale > 0 and scale != float("inf"),
        op,
        "scale (beta * batch) must be finite and > 0, got ",
        scale,
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
        op, g, output, indices, delta, block_output_sizes(g, input_sizes, forward_shaped)
    )
    return delta.new_empty(input_sizes)


def block_weight_grad(
    x, output, indices, delta, weight, stride, padding, dilation, groups, activation, pool
):
    op = "dtp_ext.block_weight_grad"
    g = parse_geometry(op, weight, stride, padding, dilation, groups, activation, pool)
    check_block_tensors(op, g, x, weight, None)
    check_same_device_dtype(op, "delta", delta, x)
    check_stored_output(op, g, output, indices, delta, block_output_sizes(g, x.shape, weight))
    return weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


# -- the private elementwise passes (torch.ops.dtp_ext._*), which the ops above call from C++ ---
def _pass_format(channels_last, pooled):
    """A pooled pass writes its output in the layout the caller asks for (channels-last: the
    CPU's choice for large maps); an unpooled one is elementwise and keeps its input's."""
    return torch.channels_last if channels_last and pooled else torch.contiguous_format


def _phi_unpool_difference(
    op,
    a,
    a_noise,
    alpha,
    a_indices,
    phi_b,
    b_indices,
    out_sizes,
    pool,
    activation,
    scale,
    channels_last,
):
    return torch.empty(
        out_sizes,
        dtype=a.dtype,
        device=a.device,
        memory_format=_pass_format(channels_last, a_indices is not None),
    )


def _noisy_difference(z_noisy, clean_phi_output, clean_indices, activation, pool, channels_last):
    return torch.empty(
        z_noisy.shape,
        dtype=z_noisy.dtype,
        device=z_noisy.device,
        memory_format=_pass_format(channels_last, pool > 1),
    )


def _sgd_ldrl_update(
    weight,
    momentum_buffer,
    reconstruction_pairing,
    noise_pairing,
    grad_scale,
    weight_decay,
    momentum,
    lr,
):
    # <weight, noise_pairing> before the step: a reduction, float32 for a low-precision weight.
    dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
    return weight.new_empty((), dtype=dtype)


def _activation_pool_backward(op, output, indices, delta, out_sizes, pool, activation):
    return output.new_empty(out_sizes)
