"""Errors that exit 2 with one line naming the argument or file and what was
expected, never a traceback: --out that cannot be a run folder (before any data is read),
damaged data files and out-of-range labels (naming the file and where good copies come from),
hand-edited checkpoints with impossible counters (refused, not reported as finished), and
`dtp-ext figure` options it cannot honour (before any data is read)."""

import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dtp_ext.cli import main
from dtp_ext.train import figures, runner
from tests.helpers.datasets import fake_mnist, write_idx
from tests.helpers.tiny_runs import tiny_args

TINY = tiny_args(64, 32)


def one_line_error(capsys, *words):
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


@pytest.fixture
def no_data_read(monkeypatch):
    """Fails the test if the command reads any data before refusing."""

    def refuse(*args, **kwargs):
        raise AssertionError("data was read before the error")

    monkeypatch.setattr(runner, "load_split", refuse)
    monkeypatch.setattr(figures, "load_split", refuse)


# -- --out ------------------------------------------------------------------------------------
def test_out_is_a_file(tmp_path, capsys, no_data_read):
    (tmp_path / "f").write_text("x")
    assert main(["train", *TINY, "--out", str(tmp_path / "f")]) == 2
    one_line_error(capsys, f"--out {tmp_path / 'f'}: is a file, expected a folder")


def test_out_under_a_file(tmp_path, capsys, no_data_read):
    (tmp_path / "f").write_text("x")
    assert main(["train", *TINY, "--out", str(tmp_path / "f" / "a" / "run")]) == 2
    one_line_error(capsys, f"{tmp_path / 'f'} is a file, so no folder can be created under it")


def test_out_with_a_name_longer_than_the_file_system_allows(tmp_path, capsys, no_data_read):
    assert main(["train", *TINY, "--out", str(tmp_path / ("x" * 300) / "run")]) == 2
    one_line_error(capsys, "--out: the folder name", "300 bytes long", "allows 255")


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("--beta", "1e308", "beta must be at most 1e+06"),
        ("--feedback-warmup-factor", str(10**12), "feedback_warmup_factor must be at most 1e+09"),
        ("--seed", str(10**20), "seed must be at most"),
        ("--feedback-iterations", str(2**63), "feedback_iterations entries must be at most"),
    ],
)
def test_finite_but_overflowing_settings_are_refused_where_checked(
    tmp_path, capsys, no_data_read, option, value, says
):
    assert main(["train", *TINY, option, value, "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, says)


def test_warmup_factor_times_iterations_is_bounded(tmp_path, capsys, no_data_read):
    args = ["--feedback-warmup-steps", "1", "--feedback-warmup-factor", "100000000"]
    assert main(["train", *TINY, *args, "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "warm-up iterations per step; at most 1000000000")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder(tmp_path, capsys, no_data_read):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["train", *TINY, "--out", str(folder / "run")]) == 2
        one_line_error(capsys, "is not writable (permission denied)")
    finally:
        folder.chmod(0o755)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not Path("/sys/kernel").is_dir(), reason="needs sysfs"
)
def test_out_where_no_folder_can_be_made(capsys, no_data_read):
    """/sys refuses new folders to every user (root included: EPERM)."""
    assert main(["train", *TINY, "--out", "/sys/dtp-ext-run"]) == 2
    err = one_line_error(capsys, "--out /sys/dtp-ext-run: ")
    assert "not writable" in err or "cannot create the folder" in err, err


# -- data files --------------------------------------------------------------------------------
def _train_on(data_dir, capsys, dataset="mnist"):
    code = main(
        [
            "train",
            "--dataset",
            dataset,
            "--data-dir",
            str(data_dir),
            "--batch-size",
            "4",
            "--max-steps",
            "1",
            "--no-progress",
            "--threads",
            "1",
            "--out",
            str(data_dir.parent / "run"),
        ]
    )
    assert code == 2
    return capsys.readouterr().err


def _damaged(err, path, *words):
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"dtp-ext train: error: {path}: "), err
    for word in words:
        assert word in err, err


MNIST_SOURCE = "https://yann.lecun.com/exdb/mnist/"


def test_truncated_gzip(tmp_path, capsys):
    fake_mnist(tmp_path / "d")
    path = tmp_path / "d" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-100])
    _damaged(_train_on(tmp_path / "d", capsys), path, "truncated gzip file", MNIST_SOURCE)


def test_gzip_crc_mismatch(tmp_path, capsys):
    fake_mnist(tmp_path / "d")
    path = tmp_path / "d" / "train-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # the CRC-32 in the gzip trailer
    path.write_bytes(bytes(data))
    _damaged(_train_on(tmp_path / "d", capsys), path, "corrupt gzip file", "CRC", MNIST_SOURCE)


def test_idx_shorter_than_its_header_says(tmp_path, capsys):
    fake_mnist(tmp_path / "d", compress=False)
    path = tmp_path / "d" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-28])
    _damaged(
        _train_on(tmp_path / "d", capsys),
        path,
        "header says shape (5, 28, 28)",
        "holds 3892 values",
    )


def test_mnist_labels_outside_the_classes(tmp_path, capsys):
    fake_mnist(tmp_path / "d")
    labels = np.array([1, 2, 12, 3, 4], dtype=np.uint8)
    write_idx(tmp_path / "d" / "t10k-labels-idx1-ubyte.gz", labels, True)
    _damaged(
        _train_on(tmp_path / "d", capsys),
        tmp_path / "d" / "t10k-labels-idx1-ubyte.gz",
        "1 label(s) outside the 10 classes 0..9 (e.g. 12)",
    )


def _cifar(tmp_path, rows=3072, labels=(1, 2, 3)):
    folder = tmp_path / "c" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": np.zeros((3, rows), np.uint8), b"labels": list(labels)}, f)
    return folder


CIFAR_SOURCE = "https://www.cs.toronto.edu/~kriz/cifar.html"


def test_cifar_truncated_pickle(tmp_path, capsys):
    folder = _cifar(tmp_path)
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    _damaged(_train_on(tmp_path / "c", capsys, "cifar10"), path, "truncated pickle", CIFAR_SOURCE)


def test_cifar_not_a_pickle(tmp_path, capsys):
    folder = _cifar(tmp_path)
    (folder / "test_batch").write_bytes(b"<html>404 not found</html>")
    _damaged(
        _train_on(tmp_path / "c", capsys, "cifar10"),
        folder / "test_batch",
        "not a readable cifar10 pickle",
        CIFAR_SOURCE,
    )


def test_cifar_wrong_row_size(tmp_path, capsys):
    folder = _cifar(tmp_path, rows=3000)
    _damaged(
        _train_on(tmp_path / "c", capsys, "cifar10"),
        folder / "data_batch_1",
        "its 'data' has shape (3, 3000), expected rows of 3072 bytes",
    )


def test_cifar_labels_outside_the_classes(tmp_path, capsys):
    folder = _cifar(tmp_path, labels=(0, 10, 9))
    _damaged(
        _train_on(tmp_path / "c", capsys, "cifar10"),
        folder / "data_batch_1",
        "outside the 10 classes 0..9 (e.g. 10)",
    )


def test_imagenet32_damaged_npz_and_labels(tmp_path, capsys):
    root = tmp_path / "i" / "Imagenet32_train"
    root.mkdir(parents=True)
    for i in range(1, 11):
        np.savez(
            root / f"train_data_batch_{i}.npz",
            data=np.zeros((2, 3072), np.uint8),
            labels=np.array([1, 1000]),
        )
    np.savez(
        tmp_path / "i" / "val_data.npz", data=np.zeros((2, 3072), np.uint8), labels=np.array([0, 5])
    )
    bad = root / "train_data_batch_4.npz"
    bad.write_bytes(bad.read_bytes()[:50])
    _damaged(
        _train_on(tmp_path / "i", capsys, "imagenet32"),
        bad,
        "not a readable .npz file",
        "image-net.org",
    )
    np.savez(bad, data=np.zeros((2, 3072), np.uint8), labels=np.array([3, 4]))
    _damaged(
        _train_on(tmp_path / "i", capsys, "imagenet32"),
        tmp_path / "i" / "val_data.npz",
        "outside the 1000 classes 1..1000 (e.g. 0)",
    )


# -- checkpoints with impossible counters -----------------------------------------------------
@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "run"
    assert main(["train", "--max-steps", "1", "--out", str(out), *TINY]) == 0  # 2 steps per epoch
    return out


@pytest.mark.parametrize(
    "edit, words, before_data",
    [
        ({"epoch": 99}, "epoch 99 is past the run's last epoch (1)", True),
        ({"global_step": -1}, "global_step is -1, below 0", True),
        ({"step_in_epoch": -4}, "step_in_epoch is -4, below 0", True),
        (
            {"epoch": 1, "step_in_epoch": 1},
            "epoch 1 is the run's last, so no step of a further epoch (1) can follow",
            True,
        ),
        ({"global_step": 2.5}, "global_step is 2.5, not a whole number", True),
        ({"elapsed": float("nan")}, "elapsed nan is not a time in seconds", True),
        (
            {"step_in_epoch": 5, "global_step": 5},
            "step_in_epoch 5 is past the 2 steps of an epoch",
            False,
        ),
        ({"global_step": 7}, "global_step 7 is not epoch 0 x 2 steps per epoch + step 1", False),
    ],
)
def test_impossible_counters_are_refused(
    good_run, tmp_path, capsys, monkeypatch, edit, words, before_data
):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state.update(edit)
    torch.save(state, out / "checkpoint.pt")
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    if before_data:
        monkeypatch.setattr(
            runner, "load_split", lambda *a: (_ for _ in ()).throw(AssertionError("data read"))
        )
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 2
    one_line_error(capsys, f"{out / 'checkpoint.pt'}: its counters are impossible (", words)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # nothing rewritten


# -- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, words",
    [
        (
            ["jmc", "--batch-size", "0"],
            "--batch-size must be >= 1 (images in the fixed batch), got 0",
        ),
        (
            ["gmp", "--batch-size", "-3"],
            "--batch-size must be >= 1 (images in the fixed batch), got -3",
        ),
        (["jmc", "--threads", "0"], "--threads must be >= 1, got 0"),
        (["gmp", "--threads", "-2"], "--threads must be >= 1, got -2"),
        (["jmc", "--seed", "-1"], "--seed must be >= 0, got -1"),
        (["jmc", "--iterations", "10"], "--iterations for jmc must be a positive multiple of 50"),
        (["jmc", "--iterations", "120"], "--iterations for jmc must be a positive multiple of 50"),
        (["jmc", "--iterations", "0"], "--iterations for jmc must be a positive multiple of 50"),
        (["gmp", "--iterations", "0"], "--iterations must be >= 1, got 0"),
        (
            ["gmp", "--data-dir", "/no/such/folder"],
            "--data-dir /no/such/folder: not an existing folder",
        ),
    ],
)
def test_figure_options_it_cannot_honour(tmp_path, capsys, no_data_read, argv, words):
    assert main(["figure", *argv, "--out", str(tmp_path / "fig")]) == 2
    one_line_error(capsys, "dtp-ext figure: error: ", words)
    assert not (tmp_path / "fig").exists()


def test_figure_batch_larger_than_the_data(tmp_path, capsys):
    assert (
        main(
            [
                "figure",
                "gmp",
                "--batch-size",
                "70000",
                "--iterations",
                "1",
                "--out",
                str(tmp_path / "fig"),
            ]
        )
        == 2
    )
    one_line_error(capsys, "--batch-size 70000 is more than the 60000 training images of mnist")


def test_figure_out_is_a_file(tmp_path, capsys, no_data_read):
    (tmp_path / "f").write_text("x")
    assert main(["figure", "jmc", "--out", str(tmp_path / "f")]) == 2
    one_line_error(capsys, "is a file, expected a folder")


@pytest.mark.parametrize("value", ["0", "-1"])
def test_train_threads(tmp_path, capsys, no_data_read, value):
    assert main(["train", "--threads", value, "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, f"threads must be >= 1, got {value}")
