"""The fake kernels (torch.compile, FakeTensor, opcheck) against the compiled ones: the same
sizes and strides on every block geometry, the same refusals on one table of bad arguments."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dtp_ext
from tests.helpers.op_args import LOOP_STATE, block_op_args

OPS = torch.ops.dtp_ext


def run_fake(args):
    mode = FakeTensorMode()
    fake = args.map(mode.from_tensor)
    with mode:
        return fake.call()


def as_list(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


def with_float32_masters(args):
    """A loop's arguments with float32 feedback weight, bias and momenta (x bfloat16)."""
    return args.replace(**{n: args[n].float() for n in LOOP_STATE})


def bfloat16(args):
    return args.map(torch.Tensor.bfloat16)


@pytest.mark.parametrize("dtype", ["float64", "bfloat16", "bfloat16-masters"])
@pytest.mark.parametrize("op", dtp_ext.ops.OP_NAMES)
def test_fake_sizes_and_strides_equal_the_compiled_kernel(block_name, op, dtype):
    """Also in bfloat16 (losses come back float32), and for the loops with float32 masters."""
    if dtype == "bfloat16-masters" and "loop" not in op:
        pytest.skip("float32 masters are a feedback loop's state")
    args = block_op_args(block_name, torch.float64 if dtype == "float64" else torch.bfloat16)[op]
    if dtype == "bfloat16-masters":
        args = with_float32_masters(args)
    real = as_list(args.clone().call())
    fake = as_list(run_fake(args))
    assert len(real) == len(fake)
    for r, f in zip(real, fake):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), (op, block_name)


def bad_cases():
    """(op, block, description, mutate(args) -> args) for one refusal each."""
    cases = []
    for op in dtp_ext.ops.OP_NAMES:
        # The forward-shaped weight whose shape the geometry is checked against.
        w = "feedback_weight" if op == "propagate_target" else "weight"
        cases += [
            (op, "conv-elu-pool2", "activation", lambda a: a.replace(activation="gelu")),
            (op, "conv-elu-pool2", "negative pool", lambda a: a.replace(pool=-1)),
            (op, "conv-elu-pool2", "stride entries", lambda a: a.replace(stride=[1])),
            (op, "conv-elu-pool2", "padding < 0", lambda a: a.replace(padding=[-1, 0])),
            (op, "conv-elu-pool2", "groups", lambda a: a.replace(groups=3)),
            (op, "linear-tanh", "pool on linear", lambda a: a.replace(pool=2)),
            (op, "conv-elu-pool2", "3-D weight", lambda a, w=w: a.replace(**{w: a[w][0]})),
        ]
        if op != "propagate_target":
            cases += [
                (op, "conv-elu-pool2", "int x", lambda a: a.replace(x=a["x"].int())),
                (
                    op,
                    "conv-elu-pool2",
                    "float32 weight",
                    lambda a: a.replace(weight=a["weight"].float()),
                ),
                (op, "conv-elu-pool2", "3-D x", lambda a: a.replace(x=a["x"][0])),
                (op, "conv-elu-pool2", "channels", lambda a: a.replace(x=a["x"][:, :2])),
                (op, "linear-tanh", "features", lambda a: a.replace(x=a["x"][:, :3])),
                (op, "conv-elu-pool2", "empty batch", lambda a: a.replace(x=a["x"][:0])),
                (
                    op,
                    "conv-elu-pool2",
                    "pool larger than the map",
                    lambda a: a.replace(x=a["x"][:, :, :1, :1]),
                ),
                (
                    op,
                    "conv-pool3-nobias",
                    "kernel larger than the input",
                    lambda a: a.replace(padding=[0, 0], x=a["x"][:, :, :3, :3]),
                ),
            ]
        if op != "propagate_target" and op != "block_weight_grad":
            cases += [
                (op, "conv-elu-pool2", "bias shape", lambda a: a.replace(bias=a["bias"][:2])),
                (
                    op,
                    "conv-elu-pool2",
                    "feedback_weight shape",
                    lambda a: a.replace(feedback_weight=a["feedback_weight"][:2]),
                ),
            ]
    loop_cases = [
        ("iterations", -1),
        ("noise_std", -0.5),
        ("lr", float("inf")),
        ("momentum", 1.0),
        ("weight_decay", float("nan")),
        ("chunk_iterations", 0),
    ]
    for op in ("ldrl_feedback_loop", "reconstruction_feedback_loop"):
        cases += [
            (op, "conv-elu-pool2", name, lambda a, name=name, v=v: a.replace(**{name: v}))
            for name, v in loop_cases
        ]
        cases += [
            (
                op,
                "conv-elu-pool2",
                "momentum_weight shape",
                lambda a: a.replace(momentum_weight=a["momentum_weight"][:1]),
            ),
            (
                op,
                "conv-elu-pool2",
                "feedback_bias dtype",
                lambda a: a.replace(feedback_bias=a["feedback_bias"].float()),
            ),
            (
                op,
                "conv-elu-pool2",
                "noise_x shape",
                lambda a: a.replace(noise_x=a["noise_x"][:2]),
            ),
        ]
    cases += [
        (
            "ldrl_feedback_loop",
            "conv-elu-pool2",
            "noise_x alone",
            lambda a: a.replace(noise_y=None),
        ),
        (
            "ldrl_loss",
            "conv-elu-pool2",
            "noise_y shape",
            lambda a: a.replace(noise_y=a["noise_y"][..., :2]),
        ),
        (
            "propagate_target",
            "conv-elu-pool2",
            "int delta",
            lambda a: a.replace(delta=a["delta"].int()),
        ),
        ("propagate_target", "conv-elu-pool2", "scale", lambda a: a.replace(scale=0.0)),
        (
            "propagate_target",
            "conv-elu-pool2",
            "input_sizes entries",
            lambda a: a.replace(input_sizes=a["input_sizes"][:3]),
        ),
        (
            "propagate_target",
            "conv-elu-pool2",
            "input_sizes channels",
            lambda a: a.replace(input_sizes=[a["input_sizes"][0], 7, *a["input_sizes"][2:]]),
        ),
        (
            "propagate_target",
            "conv-elu-pool2",
            "map smaller than the pool",
            lambda a: a.replace(input_sizes=[*a["input_sizes"][:2], 1, 1]),
        ),
        ("propagate_target", "conv-elu-pool2", "no output", lambda a: a.replace(output=None)),
        ("propagate_target", "conv-elu-pool2", "no indices", lambda a: a.replace(indices=None)),
        (
            "propagate_target",
            "conv-elu-pool2",
            "int32 indices",
            lambda a: a.replace(indices=a["indices"].int()),
        ),
        (
            "propagate_target",
            "conv-elu-pool2",
            "delta shape",
            lambda a: a.replace(delta=a["delta"][..., :3]),
        ),
        (
            "propagate_target",
            "linear",
            "indices without pool",
            lambda a: a.replace(indices=torch.zeros(a["delta"].shape, dtype=torch.int64)),
        ),
        (
            "block_weight_grad",
            "conv-elu-pool2",
            "float32 delta",
            lambda a: a.replace(delta=a["delta"].float()),
        ),
        ("ldrl_loss", "conv-elu-pool2", "bool x", lambda a: a.replace(x=a["x"] > 0)),
        (
            "propagate_target",
            "conv-elu-pool2",
            "int64 delta",
            lambda a: a.replace(delta=a["delta"].long()),
        ),
        # mixed precision: float32 masters only for a loop, and only with a bfloat16/float16 x
        (
            "ldrl_loss",
            "conv-elu-pool2",
            "float32 feedback_weight, bfloat16 x",
            lambda a: bfloat16(a).replace(feedback_weight=a["feedback_weight"].float()),
        ),
        (
            "ldrl_feedback_loop",
            "conv-elu-pool2",
            "float64 masters, bfloat16 x",
            lambda a: a.replace(
                **{n: a[n].bfloat16() for n in ("x", "weight", "bias", "noise_x", "noise_y")}
            ),
        ),
        (
            "ldrl_feedback_loop",
            "conv-elu-pool2",
            "bfloat16 momentum with float32 masters",
            lambda a: with_float32_masters(bfloat16(a)).replace(
                momentum_weight=a["momentum_weight"].bfloat16()
            ),
        ),
        (
            "reconstruction_feedback_loop",
            "conv-elu-pool2",
            "float32 feedback_bias, bfloat16 rest",
            lambda a: bfloat16(a).replace(feedback_bias=a["feedback_bias"].float()),
        ),
        (
            "block_weight_grad",
            "conv-elu-pool2",
            "output shape",
            lambda a: a.replace(output=a["output"][:1]),
        ),
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
    args = mutate(block_op_args(block)[op])
    with pytest.raises((RuntimeError, ValueError)) as real:
        args.call()
    with pytest.raises(RuntimeError) as fake:
        run_fake(args)
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
    args = block_op_args(name, k=2)[op]
    torch.library.opcheck(getattr(OPS, op).default, args.positional())


def test_every_op_has_a_fake_kernel_that_reads_its_arguments_by_name():
    """One fake kernel per compiled op, taking the arguments as the dispatcher passes them."""
    assert set(dtp_ext.fake_kernels.KERNELS) == set(
        dtp_ext.ops.OP_NAMES + dtp_ext.ops.PRIVATE_OP_NAMES
    )
    args = block_op_args("conv-elu-pool2")["propagate_target"]
    kernel = dtp_ext.fake_kernels.KERNELS["propagate_target"]
    by_name = kernel(**args.values)
    assert by_name.shape == kernel(*args.positional()).shape == torch.Size(args["input_sizes"])
