"""The compiled ops' arguments by name, for the tests: valid arguments of every public op for a
block of the suite's table (helpers.blocks.BLOCKS), and of every private elementwise pass.

An op's argument names and order come from its schema (dtp_ext._signatures), so a test names
what it changes (`args.replace(lr=float("inf"))`) instead of counting positions, and no test
spells an op's argument list.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import dtp_ext
from dtp_ext import _signatures
from tests.helpers.blocks import make_block


class OpArgs:
    """The arguments of one call of torch.ops.dtp_ext.<op>, by name, in the schema's order."""

    def __init__(self, op: str, /, **values):  # positional-only: a pass has an argument `op`
        expected = _signatures.names(op)
        if set(values) != set(expected):
            raise TypeError(
                f"{op} takes {list(expected)}: missing {sorted(set(expected) - set(values))}, "
                f"unknown {sorted(set(values) - set(expected))}"
            )
        self.op = op
        self.values = {name: values[name] for name in expected}

    def __getitem__(self, name: str):
        return self.values[name]

    def __repr__(self):
        return f"OpArgs({self.op!r}, {', '.join(self.values)})"

    def replace(self, **changes) -> OpArgs:
        """These arguments with some changed (by name; an unknown name is an error)."""
        unknown = set(changes) - set(self.values)
        if unknown:
            raise TypeError(f"{self.op} has no arguments {sorted(unknown)}")
        return OpArgs(self.op, **{**self.values, **changes})

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> OpArgs:
        """fn applied to every tensor argument (e.g. moved to a device, or cast)."""
        return OpArgs(
            self.op,
            **{n: fn(v) if isinstance(v, torch.Tensor) else v for n, v in self.values.items()},
        )

    def clone(self) -> OpArgs:
        """Copies of the tensors, for a call that writes in place or a test that poisons one."""
        return self.map(torch.Tensor.clone)

    def positional(self) -> tuple:
        """The arguments in the schema's order (torch.ops.dtp_ext.<op>(*positional()))."""
        return tuple(self.values.values())

    def call(self):
        """torch.ops.dtp_ext.<op> on these arguments (in-place ones are written)."""
        return getattr(torch.ops.dtp_ext, self.op)(*self.positional())

    def floating_tensors(self) -> list[str]:
        """The names of the floating-point tensor arguments (what the finite checks cover)."""
        return [
            n
            for n, v in self.values.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
        ]


# The feedback loops' in-place state: float32 master copies when x is bfloat16/float16.
LOOP_STATE = ("feedback_weight", "feedback_bias", "momentum_weight", "momentum_bias")


def block_op_args(name: str, dtype=torch.float64, k: int = 3) -> dict[str, OpArgs]:
    """Valid arguments of every public op for the block `name` of conftest.BLOCKS: its input
    batch in the op layout, noise of scale 0.1, the loops at `k` iterations in chunks of 2 with
    explicit noise, zero momentum, lr 0.01, momentum 0.9, no weight decay."""
    block, x = make_block(name, dtype)
    x = dtp_ext.reference.block_input(block, x)
    with torch.no_grad():
        s, idx, _ = dtp_ext.reference.forward_block(block, x)
    geometry = dict(zip(_signatures.GEOMETRY, block.geometry().args()))
    w, b = block.weight.detach(), None if block.bias is None else block.bias.detach()
    fw, fb = block.feedback_weight.clone(), block.feedback_bias.clone()
    nx, ny = torch.randn_like(x) * 0.1, torch.randn_like(s) * 0.1
    delta = torch.randn_like(s)
    # A block without activation and pool needs no stored output.
    output = s if block.geometry().activation != "none" or idx is not None else None
    loop = dict(
        x=x,
        weight=w,
        bias=b,
        feedback_weight=fw,
        feedback_bias=fb,
        momentum_weight=torch.zeros_like(fw),
        momentum_bias=torch.zeros_like(fb),
        iterations=k,
        noise_std=0.1,
        lr=0.01,
        momentum=0.9,
        weight_decay=0.0,
        chunk_iterations=2,
        noise_x=torch.stack([nx] * k),
        **geometry,
    )
    return {
        "ldrl_loss": OpArgs(
            "ldrl_loss",
            x=x,
            weight=w,
            bias=b,
            feedback_weight=fw,
            noise_x=nx,
            noise_y=ny,
            **geometry,
        ),
        "ldrl_feedback_loop": OpArgs("ldrl_feedback_loop", **loop, noise_y=torch.stack([ny] * k)),
        "reconstruction_feedback_loop": OpArgs("reconstruction_feedback_loop", **loop),
        "propagate_target": OpArgs(
            "propagate_target",
            output=output,
            indices=idx,
            delta=delta,
            feedback_weight=fw,
            scale=1.4,
            input_sizes=list(x.shape),
            **geometry,
            loss_scale=None,
        ),
        "block_weight_grad": OpArgs(
            "block_weight_grad",
            x=x,
            output=output,
            indices=idx,
            delta=delta,
            weight=w,
            **geometry,
        ),
    }


def private_op_args(pool=2, activation="elu", dtype=torch.float64) -> dict[str, OpArgs]:
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
        "_phi_unpool_difference": OpArgs(
            "_phi_unpool_difference",
            op="dtp_ext.test",
            a=s,
            a_noise=noise,
            alpha=0.5,
            a_indices=idx,
            phi_b=torch.tanh(s),
            b_indices=idx,
            out_sizes=list(z.shape),
            pool=pool,
            activation=activation,
            scale=1.5,
            channels_last=False,
        ),
        "_noisy_difference": OpArgs(
            "_noisy_difference",
            z_noisy=z,
            clean_phi_output=torch.tanh(s),
            clean_indices=idx,
            activation=activation,
            pool=pool,
            channels_last=False,
        ),
        "_sgd_momentum_update": OpArgs(
            "_sgd_momentum_update",
            weight=weight,
            momentum_buffer=torch.zeros_like(weight),
            reconstruction_pairing=pairing,
            noise_pairing=pairing * 0.5,
            grad_scale=0.25,
            weight_decay=1e-3,
            momentum=0.9,
            lr=0.1,
        ),
        "_activation_pool_backward": OpArgs(
            "_activation_pool_backward",
            op="dtp_ext.test",
            output=s,
            indices=idx,
            delta=noise,
            out_sizes=list(z.shape),
            pool=pool,
            activation=activation,
        ),
    }


def op_calls(device="cpu"):
    """Valid arguments (OpArgs) of every op on `device` (conv-elu-pool2, 2 iterations); the
    finite checks cover each one's floating-point tensors (`floating_tensors()`)."""
    return [
        args.map(lambda t: t.to(device)) for args in block_op_args("conv-elu-pool2", k=2).values()
    ]
