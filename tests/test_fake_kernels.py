"""The fake kernels (torch.compile, FakeTensor, opcheck) against the compiled ones: the same
sizes and strides on every block geometry, the same refusals on one table of bad arguments."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dtp_ext
from conftest import make_block

OPS = torch.ops.dtp_ext


def op_args(name, dtype=torch.float64, k=3):
    """Valid arguments of every op for one block of the test suite's table."""
    block, x = make_block(name, dtype)
    x = dtp_ext.reference.block_input(block, x)
    with torch.no_grad():
        s, idx, _ = dtp_ext.reference.forward_block(block, x)
    geo = list(block.geometry().args())
    w, b = block.weight.detach(), None if block.bias is None else block.bias.detach()
    fw, fb = block.feedback_weight.clone(), block.feedback_bias.clone()
    nx, ny = torch.randn_like(x) * 0.1, torch.randn_like(s) * 0.1
    delta = torch.randn_like(s)
    return {
        "ldrl_loss": [x, w, b, fw, nx, ny, *geo],
        "ldrl_feedback_loop": [
            x,
            w,
            b,
            fw,
            fb,
            torch.zeros_like(fw),
            torch.zeros_like(fb),
            k,
            0.1,
            0.01,
            0.9,
            0.0,
            2,
            torch.stack([nx] * k),
            torch.stack([ny] * k),
            *geo,
        ],
        "reconstruction_feedback_loop": [
            x,
            w,
            b,
            fw,
            fb,
            torch.zeros_like(fw),
            torch.zeros_like(fb),
            k,
            0.1,
            0.01,
            0.9,
            0.0,
            2,
            torch.stack([nx] * k),
            *geo,
        ],
        "propagate_target": [
            s if block.geometry().activation != "none" or idx is not None else None,
            idx,
            delta,
            fw,
            1.4,
            list(x.shape),
            *geo,
        ],
        "block_weight_grad": [
            x,
            s if block.geometry().activation != "none" or idx is not None else None,
            idx,
            delta,
            w,
            *geo,
        ],
    }


def run_fake(op, args):
    mode = FakeTensorMode()
    fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        return getattr(OPS, op)(*fake)


def as_list(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


def with_float32_masters(args):
    """A loop's arguments with float32 feedback weight, bias and momenta (x bfloat16)."""
    return [a.float() if i in (3, 4, 5, 6) else a for i, a in enumerate(args)]


@pytest.mark.parametrize("dtype", ["float64", "bfloat16", "bfloat16-masters"])
@pytest.mark.parametrize("op", dtp_ext.ops.OP_NAMES)
def test_fake_sizes_and_strides_equal_the_compiled_kernel(block_name, op, dtype):
    """Also in bfloat16 (losses come back float32), and for the loops with float32 masters."""
    if dtype == "bfloat16-masters" and "loop" not in op:
        pytest.skip("float32 masters are a feedback loop's state")
    args = op_args(block_name, torch.float64 if dtype == "float64" else torch.bfloat16)[op]
    if dtype == "bfloat16-masters":
        args = with_float32_masters(args)
    real = as_list(
        getattr(OPS, op)(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    )
    fake = as_list(run_fake(op, args))
    assert len(real) == len(fake)
    for r, f in zip(real, fake):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), (op, block_name)


def replace(args, index, value):
    args = list(args)
    args[index] = value
    return args


def geo_at(op):
    """Index of the first geometry argument (stride) of each op."""
    return {
        "ldrl_loss": 6,
        "ldrl_feedback_loop": 15,
        "reconstruction_feedback_loop": 14,
        "propagate_target": 6,
        "block_weight_grad": 5,
    }[op]


def bad_cases():
    """(op, block, description, mutate(args) -> args) for one refusal each."""
    cases = []
    for op in dtp_ext.ops.OP_NAMES:
        g = geo_at(op)
        x_at = None if op == "propagate_target" else 0
        w_at = {"propagate_target": 3, "block_weight_grad": 4}.get(op, 1)
        cases += [
            (op, "conv-elu-pool2", "activation", lambda a, g=g: replace(a, g + 4, "gelu")),
            (op, "conv-elu-pool2", "negative pool", lambda a, g=g: replace(a, g + 5, -1)),
            (op, "conv-elu-pool2", "stride entries", lambda a, g=g: replace(a, g, [1])),
            (op, "conv-elu-pool2", "padding < 0", lambda a, g=g: replace(a, g + 1, [-1, 0])),
            (op, "conv-elu-pool2", "groups", lambda a, g=g: replace(a, g + 3, 3)),
            (op, "linear-tanh", "pool on linear", lambda a, g=g: replace(a, g + 5, 2)),
            (op, "conv-elu-pool2", "3-D weight", lambda a, w=w_at: replace(a, w, a[w][0])),
        ]
        if x_at is not None:
            cases += [
                (op, "conv-elu-pool2", "int x", lambda a: replace(a, 0, a[0].int())),
                (
                    op,
                    "conv-elu-pool2",
                    "float32 weight",
                    lambda a, w=w_at: replace(a, w, a[w].float()),
                ),
                (op, "conv-elu-pool2", "3-D x", lambda a: replace(a, 0, a[0][0])),
                (op, "conv-elu-pool2", "channels", lambda a: replace(a, 0, a[0][:, :2])),
                (op, "linear-tanh", "features", lambda a: replace(a, 0, a[0][:, :3])),
                (op, "conv-elu-pool2", "empty batch", lambda a: replace(a, 0, a[0][:0])),
                (
                    op,
                    "conv-elu-pool2",
                    "pool larger than the map",
                    lambda a: replace(a, 0, a[0][:, :, :1, :1]),
                ),
                (
                    op,
                    "conv-pool3-nobias",
                    "kernel larger than the input",
                    lambda a, g=g: replace(replace(a, g + 1, [0, 0]), 0, a[0][:, :, :3, :3]),
                ),
            ]
        if op != "propagate_target" and op != "block_weight_grad":
            cases += [
                (op, "conv-elu-pool2", "bias shape", lambda a: replace(a, 2, a[2][:2])),
                (op, "conv-elu-pool2", "feedback_weight shape", lambda a: replace(a, 3, a[3][:2])),
            ]
    loop_cases = [
        ("iterations", 7, -1),
        ("noise_std", 8, -0.5),
        ("lr", 9, float("inf")),
        ("momentum", 10, 1.0),
        ("weight_decay", 11, float("nan")),
        ("chunk", 12, 0),
    ]
    for op in ("ldrl_feedback_loop", "reconstruction_feedback_loop"):
        cases += [
            (op, "conv-elu-pool2", name, lambda a, i=i, v=v: replace(a, i, v))
            for name, i, v in loop_cases
        ]
        cases += [
            (op, "conv-elu-pool2", "momentum_weight shape", lambda a: replace(a, 5, a[5][:1])),
            (op, "conv-elu-pool2", "feedback_bias dtype", lambda a: replace(a, 4, a[4].float())),
            (op, "conv-elu-pool2", "noise_x shape", lambda a: replace(a, 13, a[13][:2])),
        ]
    cases += [
        ("ldrl_feedback_loop", "conv-elu-pool2", "noise_x alone", lambda a: replace(a, 14, None)),
        ("ldrl_loss", "conv-elu-pool2", "noise_y shape", lambda a: replace(a, 5, a[5][..., :2])),
        ("propagate_target", "conv-elu-pool2", "int delta", lambda a: replace(a, 2, a[2].int())),
        ("propagate_target", "conv-elu-pool2", "scale", lambda a: replace(a, 4, 0.0)),
        (
            "propagate_target",
            "conv-elu-pool2",
            "input_sizes entries",
            lambda a: replace(a, 5, a[5][:3]),
        ),
        (
            "propagate_target",
            "conv-elu-pool2",
            "input_sizes channels",
            lambda a: replace(a, 5, [a[5][0], 7, *a[5][2:]]),
        ),
        (
            "propagate_target",
            "conv-elu-pool2",
            "map smaller than the pool",
            lambda a: replace(a, 5, [*a[5][:2], 1, 1]),
        ),
        ("propagate_target", "conv-elu-pool2", "no output", lambda a: replace(a, 0, None)),
        ("propagate_target", "conv-elu-pool2", "no indices", lambda a: replace(a, 1, None)),
        (
            "propagate_target",
            "conv-elu-pool2",
            "int32 indices",
            lambda a: replace(a, 1, a[1].int()),
        ),
        (
            "propagate_target",
            "conv-elu-pool2",
            "delta shape",
            lambda a: replace(a, 2, a[2][..., :3]),
        ),
        (
            "propagate_target",
            "linear",
            "indices without pool",
            lambda a: replace(a, 1, torch.zeros(a[2].shape, dtype=torch.int64)),
        ),
        (
            "block_weight_grad",
            "conv-elu-pool2",
            "float32 delta",
            lambda a: replace(a, 3, a[3].float()),
        ),
        ("ldrl_loss", "conv-elu-pool2", "bool x", lambda a: replace(a, 0, a[0] > 0)),
        ("propagate_target", "conv-elu-pool2", "int64 delta", lambda a: replace(a, 2, a[2].long())),
        # mixed precision: float32 masters only for a loop, and only with a bfloat16/float16 x
        (
            "ldrl_loss",
            "conv-elu-pool2",
            "float32 feedback_weight, bfloat16 x",
            lambda a: replace(
                [t.bfloat16() if isinstance(t, torch.Tensor) else t for t in a], 3, a[3].float()
            ),
        ),
        (
            "ldrl_feedback_loop",
            "conv-elu-pool2",
            "float64 masters, bfloat16 x",
            lambda a: [t.bfloat16() if i in (0, 1, 2, 13, 14) else t for i, t in enumerate(a)],
        ),
        (
            "ldrl_feedback_loop",
            "conv-elu-pool2",
            "bfloat16 momentum with float32 masters",
            lambda a: replace(
                with_float32_masters(
                    [t.bfloat16() if isinstance(t, torch.Tensor) else t for t in a]
                ),
                5,
                a[5].bfloat16(),
            ),
        ),
        (
            "reconstruction_feedback_loop",
            "conv-elu-pool2",
            "float32 feedback_bias, bfloat16 rest",
            lambda a: replace(
                [t.bfloat16() if isinstance(t, torch.Tensor) else t for t in a], 4, a[4].float()
            ),
        ),
        ("block_weight_grad", "conv-elu-pool2", "output shape", lambda a: replace(a, 1, a[1][:1])),
    ]
    return cases


CASES = bad_cases()


def first_line_before_value(exc):
    """The message up to the offending value (C++ and Python print numbers differently)."""
    line = str(exc).splitlines()[0]
    return line.rsplit(", got", 1)[0]


@pytest.mark.parametrize(
    "op, block, what, mutate", CASES, ids=[f"{op}-{block}-{what}" for op, block, what, _ in CASES]
)
def test_fake_kernel_refuses_what_the_compiled_kernel_refuses(op, block, what, mutate):
    args = mutate(op_args(block)[op])
    with pytest.raises((RuntimeError, ValueError)) as real:
        getattr(OPS, op)(*args)
    with pytest.raises(RuntimeError) as fake:
        run_fake(op, args)
    assert f"dtp_ext.{op}: " in str(real.value)
    assert first_line_before_value(fake.value) == first_line_before_value(real.value)


@pytest.mark.parametrize(
    "name",
    [
        "conv-elu-pool2",
        "linear-tanh",
        "conv-elu-pool2-large",
        "conv-stride2-tanh",
        "conv-small-map",
    ],
)
@pytest.mark.parametrize("op", dtp_ext.ops.OP_NAMES)
def test_opcheck_every_op_small_and_large_maps(name, op):
    args = op_args(name, k=2)[op]
    torch.library.opcheck(getattr(OPS, op).default, tuple(args))
