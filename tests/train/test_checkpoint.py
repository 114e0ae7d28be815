"""`dtp-ext train --resume` with a checkpoint that is damaged, foreign, or from another run: a
clear error naming the file (exit code 2), never a pickle or zip traceback, and no code run."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from dtp_ext.cli import main
from dtp_ext.train import CheckpointError, TrainConfig, resolve
from dtp_ext.train import checkpoint as ckpt
from dtp_ext.train.runner import Run
from tests.helpers.tiny_runs import tiny_args

TINY = tiny_args(64, 32)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "run"
    assert main(["train", "--max-steps", "1", "--out", str(out), *TINY]) == 0
    return out


def _copy(good_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    return out


def _resume(out, capsys, *extra):
    code = main(["train", "--resume", "--out", str(out), "--no-progress", *extra])
    return code, capsys.readouterr().err


def _expect_error(out, capsys, *words):
    code, err = _resume(out, capsys)
    assert code == 2, err
    assert str(out / "checkpoint.pt") in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def test_good_checkpoint_resumes(good_run, tmp_path, capsys):
    out = _copy(good_run, tmp_path)
    code, err = _resume(out, capsys, "--max-steps", "2")
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["global_step"] == 2


@pytest.mark.parametrize(
    "cut, words", [(0.5, ["truncated"]), (0.999, ["truncated"]), (0.0, ["empty"])]
)
def test_truncated_checkpoint(good_run, tmp_path, capsys, cut, words):
    out = _copy(good_run, tmp_path)
    path = out / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    _expect_error(out, capsys, *words)


def test_corrupted_bytes_inside_the_archive(good_run, tmp_path, capsys):
    out = _copy(good_run, tmp_path)
    path = out / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(
        64
    )  # inside a tensor's bytes: torch.load alone would not notice
    path.write_bytes(bytes(data))
    _expect_error(out, capsys, "damaged", "CRC")


def test_non_torch_file(good_run, tmp_path, capsys):
    out = _copy(good_run, tmp_path)
    (out / "checkpoint.pt").write_text("epoch: 3\nthis is not a checkpoint\n")
    _expect_error(out, capsys, "not a PyTorch checkpoint")


@pytest.mark.parametrize(
    "content, words",
    [
        (
            {"state_dict": {"w": torch.zeros(3)}, "epoch": 2},
            ["not a dtp-ext train checkpoint", "lacks", "'config'"],
        ),
        ([torch.zeros(2)], ["holds a list"]),
    ],
)
def test_foreign_torch_file(good_run, tmp_path, capsys, content, words):
    out = _copy(good_run, tmp_path)
    torch.save(content, out / "checkpoint.pt")
    _expect_error(out, capsys, *words)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_refused_without_running_it(good_run, tmp_path, capsys):
    out = _copy(good_run, tmp_path)
    marker = tmp_path / "code-ran"
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["extra"] = _Payload(marker)
    torch.save(state, out / "checkpoint.pt")
    _expect_error(out, capsys, "not unpickled")
    assert not marker.exists()


def test_options_of_another_version(good_run, tmp_path, capsys):
    out = _copy(good_run, tmp_path)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["config"]["layer_norm"] = True
    torch.save(state, out / "checkpoint.pt")
    _expect_error(out, capsys, "options this version of dtp_ext does not know", "layer_norm")


def test_state_of_another_algorithm(good_run, tmp_path, capsys):
    """An ldrl checkpoint whose config was edited to drl: the saved state does not fit."""
    out = _copy(good_run, tmp_path)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["config"]["algorithm"] = "drl"
    torch.save(state, out / "checkpoint.pt")
    _expect_error(out, capsys, "does not fit a drl run", "mnist-convnet")


def test_weights_of_another_model(good_run, tmp_path, capsys):
    out = _copy(good_run, tmp_path)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["model"]["conv2.weight"] = torch.zeros(8, 16, 3, 3)
    torch.save(state, out / "checkpoint.pt")
    _expect_error(out, capsys, "does not fit", "conv2.weight")


def test_resume_with_another_algorithm_on_the_command_line(good_run, tmp_path, capsys):
    out = _copy(good_run, tmp_path)
    code, err = _resume(out, capsys, "--algorithm", "bp")
    assert code == 2 and str(out / "checkpoint.pt") in err
    assert "--algorithm (saved 'ldrl', given 'bp')" in err, err


def test_run_restore_checks_the_configuration(good_run):
    """The library path: Run.restore refuses a checkpoint of another configuration."""
    state = ckpt.read(good_run / "checkpoint.pt")
    cfg = resolve(
        TrainConfig(
            algorithm="bp",
            train_subset=64,
            test_subset=32,
            batch_size=32,
            progress=False,
            out=str(good_run),
        )
    )
    with pytest.raises(
        CheckpointError, match=r"algorithm: checkpoint 'ldrl', this run 'bp'"
    ) as info:
        Run(cfg, log=lambda *a: None).restore(state, source=good_run / "checkpoint.pt")
    assert str(good_run / "checkpoint.pt") in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.fixture
def small_tmpfs(tmp_path, request):
    """A small tmpfs (1 MiB, or the test's `size` param; root on Linux); skipped where mounting
    is not allowed."""
    import subprocess

    where = tmp_path / "tmpfs"
    where.mkdir()
    size = getattr(request, "param", "1m")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(small_tmpfs):
    path = small_tmpfs / ckpt.CHECKPOINT_NAME
    ckpt.save_atomic({"step": 3}, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError) as err:
        ckpt.save_atomic(
            {"w": torch.zeros(2**20)}, path, kept="the previous checkpoint (step 3) is kept"
        )
    assert str(err.value).startswith("no space left on device: checkpoint not written")
    assert str(err.value).endswith("the previous checkpoint (step 3) is kept")
    assert path.read_bytes() == before
    assert sorted(p.name for p in small_tmpfs.iterdir()) == [ckpt.CHECKPOINT_NAME]


@pytest.mark.parametrize("small_tmpfs", ["600k"], indirect=True)
def test_a_run_on_a_full_disk_exits_with_one_line_and_no_traceback(small_tmpfs, capsys):
    """Room for one checkpoint (~320 kB) but not for the temporary copy of the next."""
    out = small_tmpfs / "run"
    code = main(["train", "--max-steps", "3", "--checkpoint-every", "1", "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().endswith("the previous checkpoint (step 1) is kept"), err
    assert "no space left on device: checkpoint not written" in err
    assert not list(out.glob(".checkpoint.pt.*.tmp"))
    assert torch.load(out / ckpt.CHECKPOINT_NAME, weights_only=False)["global_step"] == 1


def test_a_stale_temporary_checkpoint_is_removed_by_the_next_run(good_run, tmp_path, capsys):
    out = _copy(good_run, tmp_path)
    stale = out / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    code, _ = _resume(out, capsys, "--max-steps", "2")
    assert code == 0 and not stale.exists()


@pytest.mark.parametrize(
    "damage",
    [
        b'{"step": 1, "train_lo',  # a cut last line
        b"[1, 2, 3]",  # not an object
        b"\xff\xfe not utf-8",
        b'{"train_loss": 1.0}',  # no step
    ],
    ids=["cut", "not-an-object", "not-utf8", "missing-key"],
)
def test_resume_skips_damaged_log_lines_and_names_them(good_run, tmp_path, capsys, damage):
    out = _copy(good_run, tmp_path)
    for name in ("steps.jsonl", "metrics.jsonl"):
        with open(out / name, "ab") as f:
            f.write(damage + b"\n")
    code = main(["train", "--resume", "--out", str(out), "--max-steps", "2"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "Traceback" not in printed.err
    assert "steps.jsonl: skipped damaged line(s) 2" in printed.out
    lines = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
