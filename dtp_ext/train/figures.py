"""The paper's alignment figures (docs/maths.md §12), which `dtp-ext figure jmc|gmp` writes (its command
line: dtp_ext/cli/figure.py).

jmc: on one fixed batch, train only the feedback of the output block for many iterations and
     follow its alignment with the forward Jacobian: L-DRL's V against W^T, DRL's direct
     feedback Q to the penultimate layer against the same W^T (both are the output block's
     Jacobian transpose, the Jacobian Matching Condition).
gmp: on one fixed batch, train the feedback of every block, then measure per layer the angle
     between the update and backprop's gradient: L-DRL, L-DRL with random (untrained)
     feedback, and DRL (the Gradient Matching Property).
Each writes <out>/<name>.json and <out>/<name>.png.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import dtp_ext  # noqa: E402
from dtp_ext.metrics import angle_degrees  # noqa: E402
from dtp_ext.reference import backprop_gradients  # noqa: E402

from .algorithms import FeedbackSettings, make_algorithm  # noqa: E402
from .batches import normalise  # noqa: E402
from .catalog import DEFAULT_MODEL, build_model, model_spec  # noqa: E402
from .chain import forward_records  # noqa: E402
from .config import ConfigError  # noqa: E402
from .datasets import INFO, load_split  # noqa: E402

JMC_EVERY = 50  # jmc measures the alignment every this many feedback iterations


def fixed_batch(dataset: str, data_dir: str | None, size: int):
    info = INFO[dataset]
    data = load_split(dataset, data_dir, "train")
    if size > len(data):
        raise ConfigError(
            f"--batch-size {size} is more than the {len(data)} training images of {dataset}"
        )
    data = data.subset(size)
    return normalise(data.images, info.mean, info.std), data.labels, info


def _model(dataset: str, seed: int):
    info = INFO[dataset]
    torch.manual_seed(seed)
    name = DEFAULT_MODEL[dataset]
    return name, build_model(name, info.channels, info.size, info.classes, 0.7)


def _alignment(w: torch.Tensor, v: torch.Tensor):
    return angle_degrees(w, v), float((w - v).norm() / w.norm())


def jmc(
    dataset="mnist",
    data_dir=None,
    iterations=3000,
    every=JMC_EVERY,
    batch_size=128,
    seed=0,
    ldrl_noise=0.08,
    ldrl_lr=0.05,
    drl_noise=0.1,
    drl_lr=0.02,
) -> dict:
    x, y, info = fixed_batch(dataset, data_dir, batch_size)
    name, model = _model(dataset, seed)
    last_name, last = dtp_ext.dtp_blocks(model)[-1]
    model.train()
    with torch.no_grad():
        model(x)  # records the output block's input
    trainer = dtp_ext.FeedbackTrainer(model, every, ldrl_noise, ldrl_lr, blocks=[last_name])
    settings = FeedbackSettings(
        [every] * (len(dtp_ext.dtp_blocks(model)) - 1), [drl_noise] * 9, [drl_lr] * 9
    )
    drl = make_algorithm(
        "drl", model, settings, (info.channels, info.size, info.size), info.classes
    )
    with torch.no_grad():
        logits, records = forward_records(model, x)
    w = last.weight.detach()
    curves = {
        "iteration": [0],
        "ldrl_angle": [],
        "ldrl_distance": [],
        "drl_angle": [],
        "drl_distance": [],
    }

    def measure():
        for key, v in (("ldrl", last.feedback_weight.t()), ("drl", drl.Q[-1].t())):
            angle, distance = _alignment(w, v.reshape(w.shape))
            curves[f"{key}_angle"].append(angle)
            curves[f"{key}_distance"].append(distance)

    measure()
    torch.manual_seed(seed + 1)
    for done in range(every, iterations + 1, every):
        # Cosine-decayed feedback lr: a constant one leaves V jittering a few degrees off W^T
        # (the eps-term of the L-DRL gradient is zero-mean noise), a decayed one settles.
        decay = 0.5 * (1 + math.cos(math.pi * (done - every) / iterations))
        trainer.lr = [ldrl_lr * decay]
        drl.feedback.lr = [drl_lr * decay] * len(drl.Q)
        trainer.step()
        drl.train_feedback(
            records, logits, step=0, layers=[len(drl.Q) - 1]
        )  # penultimate layer's Q only
        curves["iteration"].append(done)
        measure()
    return {
        "figure": "jmc",
        "dataset": dataset,
        "model": name,
        "block": last_name,
        "batch_size": batch_size,
        "seed": seed,
        "ldrl": {"noise": ldrl_noise, "lr": ldrl_lr},
        "drl": {"noise": drl_noise, "lr": drl_lr},
        **curves,
    }


def gmp(dataset="mnist", data_dir=None, iterations=1000, batch_size=128, seed=0) -> dict:
    x, y, info = fixed_batch(dataset, data_dir, batch_size)
    shape = (info.channels, info.size, info.size)
    results: dict[str, dict[str, float]] = {}
    for variant in ("ldrl", "ldrl-random", "drl"):
        name, model = _model(dataset, seed)  # the same weights for every variant
        algorithm = "drl" if variant == "drl" else "ldrl"
        defaults = model_spec(name).feedback_defaults(algorithm)
        k = 0 if variant == "ldrl-random" else iterations
        settings = FeedbackSettings([k] * len(defaults[0]), defaults[1], defaults[2])
        algo = make_algorithm(algorithm, model, settings, shape, info.classes)
        torch.manual_seed(seed + 1)
        model.train()
        if variant == "drl":
            with torch.no_grad():
                logits, records = forward_records(model, x)
            algo.train_feedback(records, logits, step=0)
        elif k:
            model(x)  # with autograd on: the trainer reads from the graph which blocks need targets
            algo.trainer.step()
        ours = algo.update_directions(x, y)
        bp = backprop_gradients(model, algo.blocks, x, y)
        results[variant] = {
            n: angle_degrees(g, g_bp) for (n, _), g, g_bp in zip(algo.blocks, ours, bp)
        }
    return {
        "figure": "gmp",
        "dataset": dataset,
        "model": name,
        "iterations": iterations,
        "batch_size": batch_size,
        "seed": seed,
        "angles": results,
    }


def plot_jmc(data: dict, path: Path):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label in (("ldrl", "L-DRL"), ("drl", "DRL")):
        axes[0].plot(data["iteration"], data[f"{key}_angle"], label=label)
        axes[1].plot(data["iteration"], data[f"{key}_distance"], label=label)
    axes[0].set(xlabel="feedback iteration", ylabel="angle to W^T (deg)", title="JMC: output block")
    axes[1].set(xlabel="feedback iteration", ylabel="|W - V| / |W|", yscale="log")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gmp(data: dict, path: Path):
    variants = list(data["angles"])
    layers = list(data["angles"][variants[0]])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        ax.bar(
            [j + i * width for j in range(len(layers))],
            [data["angles"][variant][n] for n in layers],
            width,
            label=variant,
        )
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(layers))], layers)
    ax.set(ylabel="angle to backprop gradient (deg)", title="GMP: per-layer update angle")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_figure(kind: str, out: Path, **options) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = jmc(**options) if kind == "jmc" else gmp(**options)
    (out / f"{kind}.json").write_text(json.dumps(data, indent=2))
    (plot_jmc if kind == "jmc" else plot_gmp)(data, out / f"{kind}.png")
    return data
