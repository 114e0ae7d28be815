"""One writer per run folder. A second `dtp-ext train` on an --out that a
running process writes is refused (exit 2, one line naming the holder) whatever its options
(fresh, --overwrite, --resume), and the first run's outputs stay intact. That a run killed with
SIGKILL leaves no stale lock is tested in tests/train/test_signals.py
(test_a_killed_run_leaves_no_stale_lock)."""

import json

import pytest

from dtp_ext.cli import main
from dtp_ext.train.config import ConfigError
from dtp_ext.train.outdir import RunLock
from tests.helpers.processes import ARGS, launch, wait_for_lines


@pytest.mark.integration
def test_a_second_writer_is_refused_while_the_first_runs(tmp_path, capsys):
    out = tmp_path / "run"
    proc = launch(out, "--max-steps", "8")
    wait_for_lines(out, proc, 1)
    for extra in ([], ["--overwrite"]):
        assert main(["train", *ARGS, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert (
            f"--out {out}: another dtp-ext train process (pid {proc.pid}) is writing this folder"
            in err
        ), err
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 2
    assert f"(pid {proc.pid}) is writing this folder" in capsys.readouterr().err
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 8  # the first run's, untouched
    assert not (out / ".lock").exists()  # removed on a clean exit
    assert (
        main(["train", *ARGS, "--max-steps", "1", "--out", str(out), "--overwrite"]) == 0
    )  # free again


def test_the_lock_is_released_and_reacquired(tmp_path):
    lock = RunLock(str(tmp_path / "run")).acquire()
    with pytest.raises(ConfigError, match="another dtp-ext train process"):
        RunLock(
            str(tmp_path / "run")
        ).acquire()  # flock conflicts across open files, same process too
    lock.release()
    assert not (tmp_path / "run" / ".lock").exists()
    with RunLock(str(tmp_path / "run")):
        assert (tmp_path / "run" / ".lock").exists()
