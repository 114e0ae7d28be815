"""The package as a user runs it: from the repository root, and with the build missing."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dtp_ext

pytestmark = pytest.mark.integration  # subprocesses: the package as a user runs it

PACKAGE = Path(dtp_ext.__file__).resolve().parent
ROOT = PACKAGE.parent


def test_python_m_train_help_from_the_repository_root():
    """README's install is editable: `python -m dtp_ext.train` works where a user stands."""
    if not (ROOT / "setup.py").exists():  # pragma: no cover - an installed copy, not a checkout
        import pytest

        pytest.skip("dtp_ext is not imported from a source checkout")
    done = subprocess.run(
        [sys.executable, "-m", "dtp_ext.train", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "--feedback-iterations" in done.stdout


def test_missing_build_says_so_and_how_to_fix_it(tmp_path):
    """A source tree without dtp_ext/_C: the error names the missing module and the fix."""
    shutil.copytree(
        PACKAGE,
        tmp_path / "dtp_ext",
        ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__", "data"),
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # An editable install's finder would resolve dtp_ext._C to the real build: leave it out.
    code = (
        "import sys; sys.meta_path = [f for f in sys.meta_path if '__editable__' not in "
        "getattr(f, '__module__', '')]; import dtp_ext"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert done.returncode != 0
    assert "the compiled kernels (dtp_ext._C) cannot be loaded" in done.stderr
    assert "pip install --no-build-isolation -e ." in done.stderr
