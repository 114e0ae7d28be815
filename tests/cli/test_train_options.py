"""The `dtp-ext train` options come from TrainConfig's fields, one declaration each: every field
is an option, --help prints each default from the field, an option given with its default value
still overrides a preset, and the library never imports the command line."""

import argparse
import ast
import dataclasses
from pathlib import Path

import pytest

import dtp_ext
from dtp_ext.cli import main
from dtp_ext.cli import train as train_command
from dtp_ext.cli.options import given
from dtp_ext.train import PRESETS, TrainConfig
from dtp_ext.train.config import RESUMABLE


def parse(*argv):
    parser = argparse.ArgumentParser(prog="dtp-ext")
    train_command.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["train", *argv])


@pytest.fixture(scope="module")
def help_text():
    parser = argparse.ArgumentParser(prog="dtp-ext")
    sub = parser.add_subparsers(dest="command", required=True)
    return " ".join(train_command.add_parser(sub).format_help().split())


def test_every_field_is_an_option_with_its_default(help_text):
    for field in dataclasses.fields(TrainConfig):
        spelling = field.name.replace("_", "-")
        if field.default is True:
            assert f"--no-{spelling} " in help_text, field.name
            continue
        assert f"--{spelling} " in help_text, field.name
        default = field.default if field.default is not None else field.metadata.get("unset")
        if default is not None:
            shown = f"{default:g}" if isinstance(default, float) else str(default)
            assert f"(default: {shown})" in help_text, field.name


def test_only_given_options_are_kept():
    assert given(parse(), TrainConfig) == {}
    args = parse("--epochs", "1", "--no-progress", "--augment", "--feedback-lr", "0.1,0.2")
    assert given(args, TrainConfig) == {
        "epochs": 1,
        "progress": False,
        "augment": True,
        "feedback_lr": [0.1, 0.2],
    }


def test_a_given_default_overrides_the_preset(tmp_path, monkeypatch):
    seen = []

    class Run:  # stands in for the training run: records the configuration it was given
        def __init__(self, cfg):
            seen.append(cfg)

        def train(self):
            pass

    monkeypatch.setattr(train_command, "Run", Run)
    preset = "cifar10-simplevgg-ldrl"
    assert PRESETS[preset]["epochs"] != 1
    assert main(["train", "--config", preset, "--epochs", "1", "--out", str(tmp_path)]) == 0
    assert seen[0].epochs == 1 and seen[0].batch_size == PRESETS[preset]["batch_size"]


def test_resumable_options_are_declared_on_their_fields():
    assert RESUMABLE == {
        "epochs",
        "max_steps",
        "progress",
        "threads",
        "log_every",
        "checkpoint_every",
        "tensorboard",
    }


def test_the_library_never_imports_the_command_line():
    package = Path(dtp_ext.__file__).parent
    modules = [*package.glob("*.py"), *package.glob("train/**/*.py")]
    for path in modules:
        if path.name == "__main__.py":  # python -m dtp_ext.train is the command line
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
                assert not any(
                    n == "cli" or n.startswith(("cli.", "dtp_ext.cli")) for n in names
                ), path
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("dtp_ext.cli") for a in node.names), path
