"""Every ```python block of README.md and docs/**/*.md runs as written.

Each block is a complete program: it runs on its own in a fresh Python process, in an empty
temporary folder, within a timeout (synthetic data or the MNIST shipped with the package,
nothing downloaded, sized to run in seconds on a CPU). The test is named after the block's
file and first line (`README.md:82`), so a failure says which block.

Markers, written as comments on the first lines of a block, where a reader sees them too:

- `# continues the example above`: the block is a fragment that goes on from the previous
  ```python block of the same file; it runs after that block (and whatever that one continues)
  in the same process.
- `# needs: REQUIREMENT (why)`: the block needs something a test run may not have, one of
  `NEEDS` below (`cuda`: a GPU and a build with the CUDA kernels; `torchrun`: several
  processes started by torchrun, which this test does not launch). Where it is missing the
  block is skipped with that line as the reason; an unknown requirement is an error.

A block after an HTML comment `<!-- example: NAME -->` must also pass `CHECKS[NAME]`: Python
run after the block in the same process, and text its output must contain. Other fences that
look like Python (```py, ```python3, ```pycon) are refused, so no example escapes the test.
FeedbackTrainer's warnings that a block's settings are predicted unstable, or that forward
weights moved before their feedback was trained, fail the example: it must show settings that
work.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers.paths import REPO

TIMEOUT_S = 240  # per program; each takes seconds on an idle CPU, a shared one is slower

CONTINUES = "# continues the example above"
NEEDS_LINE = re.compile(r"#\s*needs:\s*(\w+)\b(.*)")


def _cuda_kernels() -> bool:
    if not torch.cuda.is_available():
        return False
    import dtp_ext

    return bool(dtp_ext.build_info().get("cuda_kernels"))


# requirement -> (is it available here?, what the skip says)
NEEDS = {
    "cuda": (_cuda_kernels, "a GPU and a build with the CUDA kernels"),
    "torchrun": (
        lambda: False,
        "several processes under torchrun, which this test does not launch",
    ),
}

CHECKS = {
    # A user's network converted, FeedbackTrainer(model) with the defaults, the user's loop.
    "conversion": (
        "assert isinstance(report, dtp_ext.ConversionReport)\n"
        "assert sum(isinstance(m, dtp_ext.DTPBlock) for m in model.modules()) == 4\n"
        "assert set(trainer.plans) == {'conv2', 'fc1', 'fc2'}\n"
        "assert all(p.grad is not None for p in model.parameters())\n",
        ["FeedbackTrainer: 3 of 4 DTP blocks trained", "planned:"],
    ),
}


@dataclass
class Block:
    path: str  # relative to the repository
    line: int  # of the opening fence
    code: str
    continues: bool
    needs: list[tuple[str, str]]  # (requirement, the marker line)
    example: str | None  # NAME of a preceding <!-- example: NAME -->

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
OTHER_PYTHON_FENCE = re.compile(
    r"^```[ \t]*(py|python3|pycon|ipython|python[ \t]+\S.*)[ \t]*$", re.M
)
EXAMPLE_MARK = re.compile(r"<!--\s*example:\s*(\S+)\s*-->\s*\Z")


def parse(text: str, path: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        code = match.group(1)
        head = [l.strip() for l in code.splitlines() if l.strip()][:3]  # the marker lines
        needs = [(m.group(1), l) for l in head if (m := NEEDS_LINE.match(l))]
        example = EXAMPLE_MARK.search(text[: match.start()].rstrip() + "\n")
        blocks.append(
            Block(
                path,
                text.count("\n", 0, match.start()) + 1,
                code,
                CONTINUES in head,
                needs,
                example.group(1) if example else None,
            )
        )
    return blocks


def program(blocks: list[Block], index: int) -> tuple[str, list[Block]]:
    """The code that runs for blocks[index]: the blocks it continues, then itself, each on its
    own lines of the Markdown file (blank lines between them), so a traceback's line numbers
    are the file's."""
    chain = [blocks[index]]
    while chain[0].continues:
        i = blocks.index(chain[0])
        if i == 0:
            raise ValueError(
                f"{chain[0].id}: says '{CONTINUES}' but is the first python block of its file"
            )
        chain.insert(0, blocks[i - 1])
    lines: list[str] = []
    for b in chain:
        lines += [""] * (b.line - len(lines))  # up to and including the opening fence
        lines += b.code.splitlines()
    return "\n".join(lines) + "\n", chain


def doc_files() -> list[Path]:
    files = [REPO / "README.md"] if (REPO / "README.md").exists() else []
    return files + sorted((REPO / "docs").rglob("*.md"))


def all_blocks() -> list[Block]:
    out = []
    for f in doc_files():
        out += parse(f.read_text(), f.relative_to(REPO).as_posix())
    return out


BLOCKS = all_blocks()


def test_the_docs_have_python_examples():
    """The README's examples are found (a broken parser would make every other test vanish)."""
    if not (REPO / "README.md").exists():
        pytest.skip("needs the source tree's README")
    readme = [b for b in BLOCKS if b.path == "README.md"]
    assert len(readme) >= 4
    assert len(readme) == (REPO / "README.md").read_text().count("```python")
    for name in CHECKS:
        assert any(b.example == name for b in readme), f"README.md lost <!-- example: {name} -->"


@pytest.mark.parametrize("path", [f.relative_to(REPO).as_posix() for f in doc_files()])
def test_no_python_block_escapes_the_test(path):
    """Python fences are ```python, requirements are known, a fragment follows a block."""
    text = (REPO / path).read_text()
    other = [m.group(0) for m in OTHER_PYTHON_FENCE.finditer(text)]
    assert not other, f"{path}: write Python examples as ```python blocks, found {other}"
    blocks = parse(text, path)
    for i, block in enumerate(blocks):
        for need, line in block.needs:
            assert need in NEEDS, (
                f"{block.id}: unknown requirement {line!r}; known: {sorted(NEEDS)}"
            )
        program(blocks, i)  # a fragment with no block before it raises


SYNTHETIC = """Intro.

```python
x = 1
```

<!-- example: demo -->
```python
# continues the example above
y = x + 1
```

```python
# needs: torchrun (two processes)
z = 3
```

```py
print("not collected")
```
"""


def test_markers_are_read():
    blocks = parse(SYNTHETIC, "demo.md")
    assert [(b.line, b.continues, b.example) for b in blocks] == [
        (3, False, None),
        (8, True, "demo"),
        (13, False, None),
    ]
    assert blocks[2].needs == [("torchrun", "# needs: torchrun (two processes)")]
    code, chain = program(blocks, 1)
    assert [b.line for b in chain] == [3, 8]
    lines = code.splitlines()  # each line where it is in the Markdown
    assert lines[3] == "x = 1" and lines[8:10] == ["# continues the example above", "y = x + 1"]
    assert lines[:3] == [""] * 3 and set(lines[4:8]) == {""}
    assert program(blocks, 2)[1] == [blocks[2]]
    assert [m.group(1) for m in OTHER_PYTHON_FENCE.finditer(SYNTHETIC)] == ["py"]
    lone = parse("```python\n# continues the example above\npass\n```\n", "lone.md")
    with pytest.raises(ValueError, match="lone.md:1: says .* first python block"):
        program(lone, 0)


# The library's warnings that an example's settings are off are errors: an example shows
# settings that work (the bfloat16 one about this CPU's instructions stays a warning).
PRELUDE = (
    "import warnings; warnings.filterwarnings('error', message="
    "r'FeedbackTrainer: (block .* predicted|the forward weights)')"
)


def run_program(code: str, tmp_path: Path, name: str = "example") -> subprocess.CompletedProcess:
    """Run `code` as the script `name`.py in `tmp_path`, PRELUDE on its first line (the
    opening fence's line or a blank line before it: the code's line numbers stay put)."""
    assert code.startswith("\n"), "the first line is PRELUDE's"
    script = tmp_path / f"{name}.py"
    script.write_text(PRELUDE + code)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("MPLBACKEND", "Agg")
    return subprocess.run(
        [sys.executable, script.name],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


@pytest.mark.integration
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[b.id for b in BLOCKS])
def test_example_runs(index, tmp_path):
    block = BLOCKS[index]
    same_file = [b for b in BLOCKS if b.path == block.path]
    code, chain = program(same_file, same_file.index(block))
    for b in chain:
        for need, line in b.needs:
            available, what = NEEDS[need]
            if not available():
                pytest.skip(f"{b.id} says {line!r}: it needs {what}")
    check, expected_output = CHECKS.get(block.example, ("", []))
    if check:
        code += f"# the test's checks of example {block.example!r}\n{check}"
    result = run_program(code, tmp_path, Path(block.path).name)  # README.md.py: its lines
    assert result.returncode == 0, (
        f"{block.id} failed (exit {result.returncode}):\n{result.stderr[-4000:]}"
    )
    for text in expected_output:
        assert text in result.stdout, f"{block.id}: {text!r} not in its output:\n{result.stdout}"
