"""Checkpoints: everything a run needs to continue bitwise identically (on the CPU).

Written atomically (a temporary file in the same folder, then os.replace), so a run killed
while saving leaves the previous checkpoint intact. Read back with `read`, which never hands
a damaged or foreign file to the training loop: an empty, truncated or non-torch file, a
member whose CRC-32 does not match, a pickle holding anything but tensors and plain values
(loaded with weights_only=True, so it cannot run code), or a dict without the keys a run
saves all give a CheckpointError naming the file and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import RESUMABLE, TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"
REQUIRED_KEYS = (
    "config",
    "model",
    "optimizer",
    "scheduler",
    "algorithm",
    "rng",
    "epoch",
    "step_in_epoch",
    "global_step",
    "counter",
    "elapsed",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and the problem."""


def rng_states() -> dict[str, Any]:
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]):
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_atomic(state: dict[str, Any], path: Path, kept: str = "the previous checkpoint is kept"):
    """Write `state` to `path` through a temporary file in the same folder (os.replace: the
    previous file stays whole until the new one is). A full disk raises CheckpointError
    saying so, and `kept` (what is left); the temporary file is removed either way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        # torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected
        # pos": read the free space before the partial file is removed.
        full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        if isinstance(exc, (OSError, RuntimeError)) and not full:
            full = shutil.disk_usage(path.parent).free < 2**20
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            raise CheckpointError(
                f"no space left on device: checkpoint not written to {path}; {kept}"
            ) from None
        raise


def remove_stale_temporaries(folder: Path, name: str = CHECKPOINT_NAME) -> list[str]:
    """Remove the temporary files save_atomic leaves when killed mid-write (.NAME.*.tmp);
    called by a run holding the folder's lock, so no other writer owns them."""
    removed = []
    for stale in Path(folder).glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)
        removed.append(stale.name)
    return removed


def _numpy_globals():
    """The numpy objects np.random.get_state() pickles: safe to allow in a weights_only load."""
    core = getattr(np, "_core", None) or np.core
    return [
        np.ndarray,
        np.dtype,
        core.multiarray._reconstruct,
        *(type(np.dtype(t)) for t in (np.uint32, np.float64)),
    ]


def _first_bad_member(path: Path) -> str | None:
    """The first member of the zip whose CRC-32 does not match its bytes (members written
    without a CRC, stored as 0, are skipped)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                try:
                    with archive.open(info) as member:
                        while member.read(1 << 24):
                            pass
                except (zipfile.BadZipFile, OSError, EOFError, ValueError):
                    return info.filename
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"? ({type(exc).__name__}: {exc})"
    return None


def _check_archive(path: Path):
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"{path}: the file is empty (0 bytes), not a checkpoint; "
            "a run killed while copying it? Start again with --overwrite"
        )
    if zipfile.is_zipfile(path):
        bad = _first_bad_member(path)
        if bad is not None:
            raise CheckpointError(
                f"{path}: the file is damaged: member {bad} fails its CRC check "
                "(corrupted on disk or in a copy); the run cannot continue from it"
            )
        return
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        raise CheckpointError(
            f"{path}: the file is truncated ({size} bytes, its zip directory is "
            "missing): a copy cut short or a full disk; the run cannot continue from it"
        )
    raise CheckpointError(
        f"{path}: not a PyTorch checkpoint (a checkpoint.pt is a zip archive written "
        f"by torch.save; this file is {size} bytes starting with {head!r})"
    )


def read(path: Path) -> dict[str, Any]:
    """The checkpoint at `path`, checked to be a complete `dtp-ext train` checkpoint."""
    path = Path(path)
    _check_archive(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\. Please|\n\n|$)", str(exc), re.S)
        why = " ".join((found.group(1) if found else str(exc)).split())[:300]
        raise CheckpointError(
            f"{path}: not a dtp-ext checkpoint: it holds objects a checkpoint never "
            f"contains, so it was not unpickled (torch.load weights_only: {why})"
        ) from None
    except Exception as exc:  # damaged zip members, CRC errors, missing records ...
        raise CheckpointError(
            f"{path}: the archive is damaged and cannot be read "
            f"({type(exc).__name__}: {str(exc).strip()[:300]})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: not a dtp-ext train checkpoint (it holds a "
            f"{type(state).__name__}, a checkpoint holds a dict)"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: not a dtp-ext train checkpoint: it lacks {missing} "
            f"(it has {sorted(map(str, state))[:12]})"
        )
    check_counters(state, path)
    return state


def check_counters(
    state: dict[str, Any], source, steps_per_epoch: int | None = None, same_world: bool = True
) -> None:
    """The epoch/step counters must describe a point a run can reach: a hand-edited checkpoint
    (epoch 99 of a 1-epoch run, a negative step) is refused rather than reported as finished.
    With `steps_per_epoch` (known once the data is read) they must also agree with it."""
    saved = saved_config(state, source)
    counters = {k: state[k] for k in ("epoch", "step_in_epoch", "global_step")}
    problems = [
        f"{k} is {v!r}, not a whole number"
        for k, v in counters.items()
        if isinstance(v, bool) or not isinstance(v, int)
    ]
    if problems:
        raise CheckpointError(
            f"{source}: its counters are impossible ({'; '.join(problems)}): the file was "
            "edited or damaged; the run cannot continue from it"
        )
    epoch, step, total = counters["epoch"], counters["step_in_epoch"], counters["global_step"]
    problems = [f"{k} is {v}, below 0" for k, v in counters.items() if v < 0]
    if isinstance(saved.epochs, int) and epoch > saved.epochs:
        problems.append(f"epoch {epoch} is past the run's last epoch ({saved.epochs})")
    if epoch == saved.epochs and step:
        problems.append(
            f"epoch {epoch} is the run's last, so no step of a further epoch ({step}) can follow"
        )
    if total < step or total < epoch:
        problems.append(
            f"global_step {total} is less than the steps its epoch {epoch} and step {step} imply"
        )
    if steps_per_epoch is not None and not problems:
        if step > steps_per_epoch:
            problems.append(f"step_in_epoch {step} is past the {steps_per_epoch} steps of an epoch")
        elif same_world and total != epoch * steps_per_epoch + step:
            problems.append(
                f"global_step {total} is not epoch {epoch} x {steps_per_epoch} steps per epoch + "
                f"step {step}"
            )
    elapsed = state.get("elapsed")
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not elapsed >= 0:
        problems.append(f"elapsed {elapsed!r} is not a time in seconds")
    if problems:
        raise CheckpointError(
            f"{source}: its counters are impossible ({'; '.join(problems)}): the file was "
            "edited or damaged; the run cannot continue from it"
        )


def load(out_dir: Path) -> dict[str, Any] | None:
    """OUT/checkpoint.pt, checked (see `read`), or None when there is none."""
    path = Path(out_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    return read(path)


def saved_config(state: dict[str, Any], source) -> TrainConfig:
    config = state.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{source}: its 'config' is a {type(config).__name__}, not a dict of options"
        )
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(map(str, config)) - known)
    if unknown:
        raise CheckpointError(
            f"{source}: its configuration has options this version of dtp_ext does "
            f"not know: {unknown} (written by another version, or not a dtp-ext checkpoint)"
        )
    return TrainConfig(**config)


def check_compatible(state: dict[str, Any], cfg: TrainConfig, source) -> None:
    """The checkpoint must come from a run of the same configuration: only the options in
    config.RESUMABLE (and the output folder) may differ."""
    saved = saved_config(state, source)
    differ = [
        f"{k}: checkpoint {getattr(saved, k)!r}, this run {getattr(cfg, k)!r}"
        for k in sorted(cfg.to_dict())
        if k not in RESUMABLE | {"out"} and getattr(saved, k) != getattr(cfg, k)
    ]
    if differ:
        raise CheckpointError(
            f"{source}: written by a run with another configuration "
            f"({saved.algorithm} on {saved.dataset}, model {saved.model}); it differs in "
            + "; ".join(differ)
        )
