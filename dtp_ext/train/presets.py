"""Named configurations for `--config NAME` (docs/maths.md §14 for the paper's benchmarks).

Learning rates here are in this library's units: for the target-propagation algorithms
lr = beta * lr_paper and weight_decay = wd_paper / beta (see config.py); eta_min likewise
scales with beta. BP presets use the paper's values unchanged.
"""

from __future__ import annotations

from typing import Any

from .catalog import MODELS
from .config import DEFAULT_LR

BETA = 0.7


def _paper_feedback(model: str, dataset: str) -> dict[str, Any]:
    """The model's L-DRL feedback settings (catalog.py), with the paper's iterations on
    `dataset` where they differ."""
    spec = MODELS[model]
    iterations, noise, lr = spec.feedback["ldrl"]
    return {
        "feedback_iterations": list(spec.paper_iterations.get(dataset, iterations)),
        "feedback_noise": list(noise),
        "feedback_lr": list(lr),
    }


def _ldrl_paper(dataset: str, lr_paper: float, batch: int) -> dict[str, Any]:
    return dict(
        _paper_feedback("simplevgg", dataset),
        algorithm="ldrl",
        dataset=dataset,
        model="simplevgg",
        epochs=90,
        batch_size=batch,
        beta=BETA,
        lr=round(BETA * lr_paper, 10),
        momentum=0.9,
        weight_decay=round(1e-4 / BETA, 10),
        scheduler="cosine",
        t_max=85,
        eta_min=round(BETA * 1e-5, 12),
        augment=True,
    )


def _mnist(dataset: str, algorithm: str, penultimate: str = "feedback") -> dict[str, Any]:
    """Full MNIST / Fashion-MNIST, 5 epochs of the small conv net, at each algorithm's default
    lr (config.DEFAULT_LR, which says why) and the model's feedback settings (catalog.py).

    `penultimate` "gradient" (presets `<dataset>-dtp-lee`, `<dataset>-tp-lee`): the last hidden
    block's target by a gradient step through the output block, as Lee et al. 2015 (why:
    docs/baselines.md); the plain `-dtp` / `-tp` presets are docs/maths.md §10's form."""
    cfg = {
        "algorithm": algorithm,
        "dataset": dataset,
        "model": "mnist-convnet",
        "epochs": 5,
        "batch_size": 64,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "scheduler": "cosine",
        "lr": DEFAULT_LR[algorithm],
    }
    if penultimate == "gradient":
        cfg["penultimate_target"] = "gradient"
    if algorithm == "tp" and penultimate == "gradient":
        # conv1 collapses at beta 0.7 (its target carries conv2's reconstruction error / beta):
        # beta 10, one step of 100x feedback iterations first (docs/baselines.md).
        cfg.update(lr=0.01, beta=10.0, feedback_warmup_steps=1, feedback_warmup_factor=100)
    return cfg


PRESETS: dict[str, dict[str, Any]] = {
    "cifar10-simplevgg-ldrl": _ldrl_paper("cifar10", 0.05, 128),
    "cifar10-simplevgg-bp": {
        "algorithm": "bp",
        "dataset": "cifar10",
        "model": "simplevgg",
        "epochs": 90,
        "batch_size": 128,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "scheduler": "cosine",
        "t_max": 85,
        "eta_min": 1e-5,
        "augment": True,
    },
    "imagenet32-simplevgg-ldrl": _ldrl_paper("imagenet32", 0.01, 256),
    "imagenet32-simplevgg-bp": {
        "algorithm": "bp",
        "dataset": "imagenet32",
        "model": "simplevgg",
        "epochs": 90,
        "batch_size": 256,
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "scheduler": "step",
        "step_size": 30,
        "gamma": 0.1,
        "augment": True,
    },
}
for _dataset in ("mnist", "fashion-mnist"):
    for _algorithm in ("bp", "ldrl", "dtp", "tp", "drl"):
        PRESETS[f"{_dataset}-{_algorithm}"] = _mnist(_dataset, _algorithm)
    for _algorithm in ("dtp", "tp"):
        PRESETS[f"{_dataset}-{_algorithm}-lee"] = _mnist(_dataset, _algorithm, "gradient")


def describe(name: str) -> str:
    """One line saying what the preset `name` sets, generated from its values."""
    p = PRESETS[name]
    parts = [
        p["algorithm"],
        p["dataset"],
        p["model"],
        f"{p['epochs']} epochs",
        f"batch {p['batch_size']}",
        f"lr {p['lr']:g}",
    ]
    if p.get("weight_decay"):
        parts.append(f"wd {p['weight_decay']:.3g}")
    scheduler = p.get("scheduler", "cosine")
    if scheduler == "cosine" and "t_max" in p:
        parts.append(f"cosine {p['t_max']} epochs then held")
    elif scheduler == "step":
        parts.append(f"StepLR({p.get('step_size', 30)}, {p.get('gamma', 0.1):g})")
    elif scheduler == "cosine":
        parts.append("cosine over the epochs")
    else:
        parts.append("constant lr")
    if "beta" in p and (p["algorithm"] != "bp"):
        parts.append(f"beta {p['beta']:g}")
    if "feedback_iterations" in p:
        parts.append("K " + "/".join(map(str, p["feedback_iterations"])))
    if "penultimate_target" in p:
        parts.append(f"penultimate target by {p['penultimate_target']}")
    if p.get("feedback_warmup_steps"):
        parts.append(
            f"first {p['feedback_warmup_steps']} step(s) with {p['feedback_warmup_factor']}x "
            "feedback iterations"
        )
    if p.get("augment"):
        parts.append("crop+flip")
    return ", ".join(parts)
