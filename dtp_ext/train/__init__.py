"""`dtp-ext train`: train a network with L-DRL or a baseline and log alignment.

from dtp_ext.train import TrainConfig, train
summary = train(TrainConfig(algorithm="ldrl", dataset="mnist", max_steps=100))
"""

from .checkpoint import CheckpointError
from .config import ConfigError, TrainConfig
from .datasets import DatasetNotFound
from .presets import PRESETS
from .resolve import resolve
from .runner import Run, TrainingDiverged


def train(cfg: TrainConfig, log=print) -> dict:
    """Resolve, train from scratch, and return the summary (also written to OUT/summary.json)."""
    return Run(resolve(cfg), log=log).train()


__all__ = [
    "TrainConfig",
    "ConfigError",
    "CheckpointError",
    "DatasetNotFound",
    "TrainingDiverged",
    "PRESETS",
    "Run",
    "resolve",
    "train",
]
