"""Named configurations for `--config NAME` (SPEC §4 for the paper's benchmarks).

Learning rates here are in this library's units: for the target-propagation algorithms
lr = beta * lr_paper and weight_decay = wd_paper / beta (see config.py); eta_min likewise
scales with beta. BP presets use the paper's values unchanged.
"""
from __future__ import annotations

from typing import Any, Dict

BETA = 0.7

_PAPER_FEEDBACK_CIFAR = {
    "feedback_iterations": [20, 30, 35, 55, 20],
    "feedback_noise": [0.4, 0.4, 0.2, 0.2, 0.08],
    "feedback_lr": [1e-4, 3.5e-4, 8e-3, 8e-3, 0.18],
}


def _ldrl_paper(dataset: str, lr_paper: float, batch: int, iterations) -> Dict[str, Any]:
    return dict(_PAPER_FEEDBACK_CIFAR, algorithm="ldrl", dataset=dataset, model="simplevgg",
                epochs=90, batch_size=batch, beta=BETA,
                lr=round(BETA * lr_paper, 10), momentum=0.9,
                weight_decay=round(1e-4 / BETA, 10), scheduler="cosine", t_max=85,
                eta_min=round(BETA * 1e-5, 12), augment=True, feedback_iterations=iterations)


def _mnist(dataset: str, algorithm: str) -> Dict[str, Any]:
    """Full MNIST / Fashion-MNIST, 5 epochs of the small conv net. lr 0.01 (gradient units) is
    the value SPEC §4 found stable for L-DRL; BP and vanilla DTP share it (the same step size in
    gradient units); TP and DRL diverge there and use 0.001."""
    cfg = {"algorithm": algorithm, "dataset": dataset, "model": "mnist-convnet", "epochs": 5,
           "batch_size": 64, "momentum": 0.9, "weight_decay": 0.0, "scheduler": "cosine",
           "lr": {"tp": 0.001, "drl": 0.001}.get(algorithm, 0.01)}
    # Feedback settings: the model's defaults for the algorithm (models.py).
    return cfg


PRESETS: Dict[str, Dict[str, Any]] = {
    "cifar10-simplevgg-ldrl": _ldrl_paper("cifar10", 0.05, 128, [20, 30, 35, 55, 20]),
    "cifar10-simplevgg-bp": {"algorithm": "bp", "dataset": "cifar10", "model": "simplevgg",
                             "epochs": 90, "batch_size": 128, "lr": 0.05, "momentum": 0.9,
                             "weight_decay": 1e-4, "scheduler": "cosine", "t_max": 85,
                             "eta_min": 1e-5, "augment": True},
    "imagenet32-simplevgg-ldrl": _ldrl_paper("imagenet32", 0.01, 256, [25, 35, 40, 60, 25]),
    "imagenet32-simplevgg-bp": {"algorithm": "bp", "dataset": "imagenet32", "model": "simplevgg",
                                "epochs": 90, "batch_size": 256, "lr": 0.01, "momentum": 0.9,
                                "weight_decay": 1e-4, "scheduler": "step", "step_size": 30,
                                "gamma": 0.1, "augment": True},
}
for _dataset in ("mnist", "fashion-mnist"):
    for _algorithm in ("bp", "ldrl", "dtp", "tp", "drl"):
        PRESETS[f"{_dataset}-{_algorithm}"] = _mnist(_dataset, _algorithm)
