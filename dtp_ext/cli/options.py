"""Command-line options generated from a config dataclass: each field is one option, declared
once by its name, annotation, default and metadata (dtp_ext/train/config.py's `option`).

The field `name_with_underscores` becomes `--name-with-underscores`; its type comes from the
annotation (int, float, str; a per-layer list takes one number or a comma list); a bool
defaulting to True becomes the flag `--no-NAME`, a bool or None the pair `--NAME/--no-NAME`.
Options not given on the command line are left out of the result (`given`), so that they never
override a preset or a --config file; --help still shows each one's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable


class Default:
    """What an option not given stands for, as --help prints it: the field's default, or its
    metadata's `unset` (what None becomes). `given` drops these from the parsed options."""

    def __init__(self, value):
        self.value = value

    def __str__(self) -> str:
        return f"{self.value:g}" if isinstance(self.value, float) else str(self.value)


def numbers(text: str):
    """'20' -> 20; '0.2' -> 0.2; '20,30,35' -> [20, 30, 35] (per-layer options)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or a comma-separated list of numbers, got {text!r}"
        ) from None
    values = [int(v) if v.is_integer() else v for v in values]
    return values[0] if len(values) == 1 else values


def _kind(hint) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of an annotation such as `int | None`."""
    args = typing.get_args(hint) or (hint,)
    scalars = [a for a in args if a is not type(None)]
    if any(typing.get_origin(a) is list for a in scalars):
        return list, type(None) in args
    (scalar,) = scalars
    return scalar, type(None) in args


def add_option(parser, field: dataclasses.Field, hint) -> argparse.Action:
    """The option of one config field on `parser` (a parser or an argument group)."""
    meta = field.metadata
    name = field.name.replace("_", "-")
    kind, optional = _kind(hint)
    if kind is bool and not optional:  # a switch: its help describes the flag itself
        return parser.add_argument(
            f"--no-{name}" if field.default else f"--{name}",
            dest=field.name,
            action="store_false" if field.default else "store_true",
            help=meta["help"],
            default=argparse.SUPPRESS,
        )
    kwargs = {key: meta[key] for key in ("choices", "metavar") if key in meta}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind is not str:
        kwargs["type"] = numbers if kind is list else kind
    shown = meta.get("unset") if field.default is None else field.default
    return parser.add_argument(
        f"--{name}",
        dest=field.name,
        help=meta["help"],
        default=argparse.SUPPRESS if shown is None else Default(shown),
        **kwargs,
    )


def add_options(
    parser: argparse.ArgumentParser,
    config: type,
    after: dict[str, Callable[[argparse.ArgumentParser], None]] | None = None,
):
    """Every field of the dataclass `config` as an option, in field order, each in the
    --help section its metadata's `group` names (None: the parser's own). `after` maps a
    field name to a function adding the command's own options (not config fields) after it."""
    hints = typing.get_type_hints(config)
    groups: dict[str | None, argparse.ArgumentParser] = {None: parser}
    for field in dataclasses.fields(config):
        group = field.metadata.get("group")
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        add_option(groups[group], field, hints[field.name])
        if after and field.name in after:
            after[field.name](groups[group])


def given(args: argparse.Namespace, config: type) -> dict:
    """The fields of `config` given on the command line, by name."""
    names = {f.name for f in dataclasses.fields(config)}
    return {k: v for k, v in vars(args).items() if k in names and not isinstance(v, Default)}
