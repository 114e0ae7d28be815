"""The small `dtp-ext train` runs the training tests share: their command-line arguments and the
same run built in-process, with its first batch."""

from dtp_ext.train import TrainConfig, resolve
from dtp_ext.train.batches import train_batches
from dtp_ext.train.runner import Run


def tiny_args(
    train: int = 96,
    test: int = 64,
    batch: int = 32,
    probe: int | None = 16,
    eval: int | None = 64,
) -> list:
    """`train` training and `test` test images, batch `batch` (train // batch steps per epoch),
    small probe and evaluation batches (None: the option left out, its default), no progress
    bars, one thread."""
    args = ["--train-subset", str(train), "--test-subset", str(test), "--batch-size", str(batch)]
    if probe is not None:
        args += ["--probe-batch-size", str(probe)]
    if eval is not None:
        args += ["--eval-batch-size", str(eval)]
    return [*args, "--no-progress", "--threads", "1"]


def tiny_run(tmp_path, algorithm: str, **options) -> Run:
    """A Run of `algorithm` on 64 training images (two steps of 32), quiet, out in tmp_path/r."""
    cfg = TrainConfig(
        algorithm=algorithm,
        train_subset=64,
        test_subset=32,
        batch_size=32,
        probe_batch_size=16,
        progress=False,
        threads=1,
        out=str(tmp_path / "r"),
        **options,
    )
    return Run(resolve(cfg), log=lambda *a: None)


def first_batch(run: Run):
    """(x, y): the run's first training batch, normalised, unshuffled."""
    _, x, y = next(
        train_batches(run.train_set, 32, 0, 0, 0, run.info.mean, run.info.std, False, "cpu")
    )
    return x, y
