"""What a newcomer meets first. `dtp-ext --version`, `dtp-ext presets` (one line each), data
errors that say where the official files come from, `dtp-ext figure` writes under runs/
(ignored by git, as is a stray ./figures), and the README says how long the install's build
takes, how to skip the CUDA kernels, how to take a quick look and how to see which kernels a
build has. (The README's examples run in tests/docs/test_examples_run.py.)"""

import argparse
import re
import shutil
import subprocess

import pytest
import torch

import dtp_ext
from dtp_ext.cli import main
from dtp_ext.cli import train as train_command
from dtp_ext.train import PRESETS
from dtp_ext.train.datasets import DatasetNotFound, load_split
from tests.helpers.paths import REPO

README = REPO / "README.md"


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert (
        capsys.readouterr().out.strip()
        == f"dtp-ext {dtp_ext.__version__} (torch {torch.__version__})"
    )


def test_presets_one_line_each(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("presets of dtp-ext train --config NAME")
    assert len(lines) == 1 + len(PRESETS)
    for line, name in zip(lines[1:], sorted(PRESETS)):
        first, description = line.split(None, 1)
        assert first == name
        preset = PRESETS[name]
        assert description.startswith(
            f"{preset['algorithm']}, {preset['dataset']}, {preset['model']}, "
            f"{preset['epochs']} epochs, batch {preset['batch_size']}, lr {preset['lr']:g}"
        )
    assert "K 20/30/35/55/20" in next(l for l in lines if l.split()[0] == "cifar10-simplevgg-ldrl")


@pytest.mark.parametrize(
    "dataset, source",
    [
        ("mnist", "https://yann.lecun.com/exdb/mnist/"),
        ("fashion-mnist", "https://github.com/zalandoresearch/fashion-mnist"),
        ("cifar10", "https://www.cs.toronto.edu/~kriz/cifar.html"),
        ("imagenet32", "https://image-net.org/download-images"),
    ],
)
def test_data_errors_say_where_the_official_files_are(tmp_path, dataset, source):
    with pytest.raises(DatasetNotFound) as info:
        load_split(dataset, str(tmp_path), "train")
    assert source in str(info.value) and "--data-dir" in str(info.value)
    if dataset != "mnist":  # mnist without --data-dir is the shipped copy
        with pytest.raises(DatasetNotFound, match=re.escape(source)):
            load_split(dataset, None, "train")


@pytest.mark.skipif(not README.exists(), reason="needs the source tree's README")
def test_readme_says_what_the_first_command_does():
    """The install-and-run command as typed, then: the build's minutes of silence, how to skip
    the CUDA kernels, and a quick look whose options the train command takes."""
    found = re.search(
        r"## Two commands\n.*?```bash\n(.*?)\n```\n\n(.*?)\n\n", README.read_text(), re.S
    )
    assert found, "README.md lost its first command"
    command, after = found.group(1), " ".join(found.group(2).split())
    assert command.endswith("&& pip install --no-build-isolation -e . && dtp-ext train")
    assert "several minutes" in after and "nothing on screen" in after
    assert "DTP_EXT_CUDA=0 pip install --no-build-isolation -e ." in after
    quick = re.search(r"`dtp-ext (train --max-steps \d+)`", after)
    assert quick, after
    parser = argparse.ArgumentParser(prog="dtp-ext")
    train_command.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(quick.group(1).split())
    assert args.command == "train" and args.max_steps == int(quick.group(1).split()[-1])


@pytest.mark.skipif(not README.exists(), reason="needs the source tree's README")
def test_readme_says_how_to_see_the_build():
    text = " ".join(README.read_text().split())
    assert "pip install -v --no-build-isolation -e ." in text
    assert 'python -c "import dtp_ext; print(dtp_ext.build_info())"' in text
    assert "dtp-ext presets" in text and "dtp-ext --version" in text


def test_figure_writes_under_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["figure", "jmc", "--iterations", "50", "--batch-size", "8", "--threads", "1"]) == 0
    assert "wrote runs/figures/jmc.png and jmc.json" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "runs" / "figures").iterdir()) == [
        "jmc.json",
        "jmc.png",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]  # nothing in the current folder itself


@pytest.mark.skipif(
    shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs the git checkout"
)
def test_git_ignores_run_outputs_but_not_the_documented_figures():
    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0

    assert ignored("runs/figures/jmc.png") and ignored(
        "runs/mnist-ldrl-20260101-000000/summary.json"
    )
    assert ignored("figures/jmc.png")  # where `dtp-ext figure` used to write
    assert not ignored("docs/figures/jmc.png")
