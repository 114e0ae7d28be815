"""Where the source checkout is, for the tests that read its files (README, docs, scripts)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
