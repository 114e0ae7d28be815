"""Turns a merged TrainConfig into a complete one: fills the options left as None from the
dataset, model and algorithm, and checks everything that depends on them (list lengths)."""

from __future__ import annotations

import dataclasses
import time

from dtp_ext import hardware

from .catalog import DEFAULT_MODEL, MODELS, model_spec, trained_block_count
from .config import (
    DEFAULT_LR,
    MAX_ITERATIONS,
    MIXED_PRECISION_ALGORITHMS,
    TARGET_ALGORITHMS,
    ConfigError,
    TrainConfig,
    per_layer,
    validate,
)
from .datasets import INFO

# What trains a model that is not a chain (a converted torchvision network).
CHAIN_FREE_ALGORITHMS = ("bp", "ldrl")


def resolve(cfg: TrainConfig) -> TrainConfig:
    validate(cfg)
    model = cfg.model or DEFAULT_MODEL[cfg.dataset]
    spec = model_spec(model)
    info = INFO[cfg.dataset]
    if info.size < spec.min_size:
        raise ConfigError(
            f"model {model!r} needs inputs of at least {spec.min_size}x{spec.min_size}; "
            f"{cfg.dataset} images are {info.size}x{info.size}"
        )
    if not spec.chain and cfg.algorithm not in CHAIN_FREE_ALGORITHMS:
        raise ConfigError(
            f"algorithm {cfg.algorithm!r} cannot train model {model!r}: {cfg.algorithm} builds its "
            "targets block by block along a chain (an nn.Sequential of DTP blocks joined by Flatten, "
            f"as {', '.join(n for n in MODELS if MODELS[n].chain)}), while {model} has BatchNorm, "
            "residual adds or concatenations between its blocks; use --algorithm "
            f"{' or '.join(CHAIN_FREE_ALGORITHMS)}, whose targets flow through autograd"
        )
    count = trained_block_count(model, info.channels, info.size, info.classes)
    lists = {}
    defaults = spec.feedback_defaults(cfg.algorithm)
    for key, default, integer in (
        ("feedback_iterations", defaults[0], True),
        ("feedback_noise", defaults[1], False),
        ("feedback_lr", defaults[2], False),
    ):
        value = default if getattr(cfg, key) is None else getattr(cfg, key)
        # None: planned per block by FeedbackTrainer (ldrl on the torchvision models).
        lists[key] = None if value is None else per_layer(key, value, count, integer=integer)
    if lists["feedback_iterations"] and cfg.feedback_warmup_steps:
        most = max(lists["feedback_iterations"]) * cfg.feedback_warmup_factor
        if most > MAX_ITERATIONS:
            raise ConfigError(
                f"feedback_warmup_factor {cfg.feedback_warmup_factor} x feedback_iterations "
                f"{max(lists['feedback_iterations'])} = {most} warm-up iterations per step; at most "
                f"{MAX_ITERATIONS}"
            )
    if lists["feedback_iterations"] is None and cfg.feedback_warmup_steps:
        raise ConfigError(
            f"feedback_warmup_steps ({cfg.feedback_warmup_steps}) multiplies the feedback "
            f"iterations, which model {model!r} plans per block (each block's first step already "
            "runs a warm start); give --feedback-iterations to use it"
        )
    if cfg.algorithm in ("dtp", "tp", "drl") and any(s == 0 for s in lists["feedback_noise"]):
        raise ConfigError(
            f"feedback_noise must be > 0 for {cfg.algorithm} (its loss divides by it "
            "or needs a perturbation to reconstruct)"
        )
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.algorithm]
    # auto: bf16 where the device computes it natively, else fp32 (emulated bf16 is slower).
    precision = cfg.precision
    if precision == "auto":
        native = cfg.algorithm in MIXED_PRECISION_ALGORITHMS and not hardware.missing_bfloat16(
            cfg.device
        )
        precision = "bf16" if native else "fp32"
    out = cfg.out or f"runs/{cfg.dataset}-{cfg.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"
    return dataclasses.replace(
        cfg,
        model=model,
        precision=precision,
        lr=lr,
        out=out,
        t_max=cfg.t_max or cfg.epochs,
        augment=info.augment if cfg.augment is None else cfg.augment,
        **lists,
    )


def lr_units_note(cfg: TrainConfig) -> str:
    if cfg.algorithm in TARGET_ALGORITHMS:
        return (
            f"lr {cfg.lr:g} in gradient units = paper lr {cfg.lr / cfg.beta:g} x beta {cfg.beta:g}"
        )
    return f"lr {cfg.lr:g} (backprop)"
