"""Each compiled op's argument list, read from the schema the library registered.

The TORCH_LIBRARY block of csrc/dtp_ext.cpp is the one place an op's arguments are written
(names, order, types). The typed wrappers (ops.py), the fake kernels (fake_kernels.py) and the
tests' argument builder (tests/helpers/op_args.py) take them from here instead of spelling the lists
again. Read once per op, after dtp_ext._C has registered the schemas.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

# The arguments every public op ends with, in this order (ops.BlockGeometry carries them).
GEOMETRY = ("stride", "padding", "dilation", "groups", "activation", "pool")


@functools.cache
def arguments(op: str) -> tuple[tuple[str, str], ...]:
    """(name, type) of each argument of torch.ops.dtp_ext.<op>, in the schema's order; types
    as the schema prints them: 'Tensor', 'Optional[Tensor]', 'int', 'float', 'List[int]',
    'str', 'bool'."""
    schema = getattr(torch.ops.dtp_ext, op).default._schema
    return tuple((a.name, str(a.type)) for a in schema.arguments)


@functools.cache
def defaults(op: str) -> dict:
    """The schema's default values of torch.ops.dtp_ext.<op>'s arguments that have one."""
    schema = getattr(torch.ops.dtp_ext, op).default._schema
    return {a.name: a.default_value for a in schema.arguments if a.has_default_value()}


def names(op: str) -> tuple[str, ...]:
    """The argument names of torch.ops.dtp_ext.<op>, in the schema's order."""
    return tuple(name for name, _ in arguments(op))


def bind(op: str, args: tuple, kwargs: dict | None = None) -> SimpleNamespace:
    """A call's arguments by name: positional ones in the schema's order, then keywords."""
    expected = names(op)
    if len(args) > len(expected):
        raise TypeError(f"dtp_ext.{op}: takes {len(expected)} arguments, got {len(args)}")
    bound = dict(zip(expected, args))
    for name, value in (kwargs or {}).items():
        if name not in expected or name in bound:
            raise TypeError(f"dtp_ext.{op}: unexpected or repeated argument {name!r}")
        bound[name] = value
    for name, default in defaults(op).items():  # a call may leave out what has a default
        bound.setdefault(name, default)
    missing = [name for name in expected if name not in bound]
    if missing:
        raise TypeError(f"dtp_ext.{op}: missing arguments {missing}")
    return SimpleNamespace(**bound)
