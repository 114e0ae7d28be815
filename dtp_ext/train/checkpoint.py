"""Checkpoints: everything a run needs to continue bitwise identically (on CPU).

Written atomically (a temporary file in the same folder, then os.replace), so a run killed
while saving leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


def rng_states() -> Dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Dict[str, Any]):
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_atomic(state: Dict[str, Any], path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(out_dir: Path) -> Optional[Dict[str, Any]]:
    path = out_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    # Our own file (RNG states are numpy/python objects), hence weights_only=False.
    return torch.load(path, map_location="cpu", weights_only=False)
