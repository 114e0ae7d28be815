"""The README's conversion example runs as written (the block after its
`<!-- example: conversion -->` marker), with the library's defaults."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_conversion_example_runs_as_written():
    text = README.read_text()
    found = re.search(r"<!-- example: conversion -->\n```python\n(.*?)```", text, re.S)
    assert found, "README.md lost its conversion example marker"
    printed = io.StringIO()
    namespace = {"__name__": "readme_example"}
    with contextlib.redirect_stdout(printed):
        exec(compile(found.group(1), "README.md (conversion example)", "exec"), namespace)
    out = printed.getvalue()
    assert "dtp_ext.convert: 4 block(s) converted" in out
    assert "FeedbackTrainer: 3 of 4 DTP blocks trained" in out and "planned:" in out
    trainer = namespace["trainer"]
    assert set(trainer.plans) == {"conv2", "fc1", "fc2"}
