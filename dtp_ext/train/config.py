"""TrainConfig: every option of `dtp-ext train`, how the defaults resolve, and validation.

Options come from three layers, later ones winning: the defaults below, a preset or a YAML/JSON
file (`--config`), then the command line. Options left as None are resolved from the dataset,
the model and the algorithm (see `resolve`), so `--dataset cifar10` alone picks SimpleVGG with
the paper's per-layer feedback settings instead of the MNIST ones.

Forward learning rates are in this library's gradient units (SPEC §3): for the DTP algorithms
lr_here = beta * lr_paper, and weight decay wd_here = wd_paper / beta keeps the paper's decay
per step (the DTP layers return grad/beta while decay is added to the gradient as is).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtp_ext.nn import MAX_BETA
from dtp_ext.reference import PENULTIMATE_TARGETS  # dtp/tp; the first is the default
from dtp_ext.trainer import MAX_ITERATIONS

ALGORITHMS = ("bp", "ldrl", "dtp", "tp", "drl")
DATASETS = ("mnist", "fashion-mnist", "cifar10", "imagenet32")
SCHEDULERS = ("cosine", "step", "none")
FEEDBACK_SYNCS = ("gradients", "weights")
DRL_VARIANTS = ("p", "s")  # algorithms/drl.py
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # precision.py; auto: resolve picks
MIXED_PRECISION_ALGORITHMS = ("bp", "ldrl")  # the others train in float32 only
TARGET_ALGORITHMS = ("ldrl", "dtp", "tp", "drl")  # forward lr in gradient units (× beta)

PerLayer = float | list[float] | None

# Options that may differ when resuming: they do not change the computation already done.
RESUMABLE = {"epochs", "max_steps", "progress", "threads", "log_every", "checkpoint_every"}


class ConfigError(ValueError):
    """A bad option value; the CLI prints it and exits before any training."""


@dataclass
class TrainConfig:
    algorithm: str = "ldrl"
    dataset: str = "mnist"
    data_dir: str | None = None  # None: the MNIST shipped with dtp_ext (mnist only)
    model: str | None = None  # None: mnist-convnet for (fashion-)mnist, simplevgg otherwise
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps in total
    batch_size: int = 64  # the global batch, split across processes under torchrun
    train_subset: int | None = None  # first N training images (None: all)
    test_subset: int | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch.set_num_threads; None leaves torch's default
    precision: str = "fp32"  # fp32, bf16, fp16 or auto (precision.py; resolve picks for auto)
    out: str | None = None  # None: runs/<dataset>-<algorithm>-<time>
    # forward optimizer (SGD) and schedule
    lr: float | None = None  # None: see resolve.DEFAULT_LR
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # per epoch; cosine holds eta_min after t_max (SPEC §9)
    t_max: int | None = None  # cosine length in epochs (None: epochs)
    eta_min: float = 0.0
    step_size: int = 30  # StepLR
    gamma: float = 0.1
    # target propagation
    beta: float = 0.7
    feedback_iterations: PerLayer = None  # per trained block, forward order (None: model default)
    feedback_noise: PerLayer = None
    feedback_lr: PerLayer = None
    feedback_momentum: float = 0.9
    feedback_warmup_steps: int = 0  # first steps train feedback weights longer ...
    feedback_warmup_factor: int = 1  # ... with this many times the iterations
    feedback_only_steps: int = 0  # the first N steps train the feedback weights only
    feedback_sync: str = "gradients"  # ldrl under several processes (distributed.py)
    feedback_memory_mb: float = 256.0  # per block: caps batching across iterations
    penultimate_target: str | None = None
    drl_variant: str | None = (
        None  # drl: None = "p" (per batch) or "s" (alternate epochs)  # dtp/tp: None = "feedback" (SPEC), or "gradient"
    )
    # data pipeline and logging
    augment: bool | None = None  # None: the paper's crop+flip for cifar10/imagenet32
    eval_batch_size: int = 1000
    probe_batch_size: int = 128  # fixed batch for the update-vs-backprop angles
    progress: bool = True
    log_every: int | None = None  # steps.jsonl: a line every N steps (None: ~20 per run, <= 50)
    checkpoint_every: int | None = (
        None  # also save the checkpoint every N steps (None: epochs, stops)
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def load_config_file(path: Path) -> dict[str, Any]:
    """Keys of a YAML or JSON file, with '-' accepted for '_' (the CLI spelling)."""
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # both parsers raise their own types
        raise ConfigError(f"--config {path}: cannot parse it: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"--config {path}: expected a mapping of option: value, got {type(data).__name__}"
        )
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def merge(*layers: dict[str, Any], source: str = "configuration") -> TrainConfig:
    values: dict[str, Any] = {}
    for layer in layers:
        unknown = sorted(set(layer) - FIELDS)
        if unknown:
            raise ConfigError(
                f"{source}: unknown option(s) {unknown}; valid options are {sorted(FIELDS)}"
            )
        values.update(layer)
    return TrainConfig(**values)


def check_choice(name, value, choices):
    """The one check of a named option against its choices (the command line, the algorithms)."""
    if value not in choices:
        allowed = " or ".join(map(repr, choices)) if len(choices) == 2 else f"one of {choices}"
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def _number(
    name, v, *, integer=False, minimum=None, positive=False, allow_none=False, maximum=None
):
    if v is None and allow_none:
        return
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if ok and integer:
        ok = float(v).is_integer()
    if not ok:
        raise ConfigError(f"{name} must be a finite {'whole ' if integer else ''}number, got {v!r}")
    if positive and v <= 0:
        raise ConfigError(f"{name} must be > 0, got {v!r}")
    if minimum is not None and v < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {v!r}")
    if maximum is not None and v > maximum:
        raise ConfigError(f"{name} must be at most {maximum:g}, got {v!r}")


def per_layer(name: str, value, count: int, *, integer=False) -> list:
    """A scalar broadcast to `count` trained blocks, or a list that must have `count` entries."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ConfigError(
            f"{name} has {len(values)} entries but the model has {count} trained "
            f"feedback blocks (one entry per block after the first, forward order)"
        )
    from dtp_ext.trainer import check_per_block  # the same rule as FeedbackTrainer's

    try:
        return check_per_block(name, values, integer=integer, owner="")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def validate(cfg: TrainConfig) -> None:
    """Checks that need neither the data nor the model (those come in `resolve`)."""
    for name, choices in (
        ("algorithm", ALGORITHMS),
        ("dataset", DATASETS),
        ("scheduler", SCHEDULERS),
        ("feedback_sync", FEEDBACK_SYNCS),
        ("precision", PRECISIONS),
    ):
        check_choice(name, getattr(cfg, name), choices)
    if cfg.precision not in ("fp32", "auto") and cfg.algorithm not in MIXED_PRECISION_ALGORITHMS:
        raise ConfigError(
            f"precision {cfg.precision!r} applies to "
            f"{' and '.join(MIXED_PRECISION_ALGORITHMS)} only; {cfg.algorithm} "
            "trains in fp32"
        )
    # Options of one family of algorithms: None means that algorithm's default.
    for name, choices, algorithms in (
        ("penultimate_target", PENULTIMATE_TARGETS, ("dtp", "tp")),
        ("drl_variant", DRL_VARIANTS, ("drl",)),
    ):
        value = getattr(cfg, name)
        if value is not None:
            check_choice(name, value, choices)
            if cfg.algorithm not in algorithms:
                raise ConfigError(
                    f"{name} applies to {' and '.join(algorithms)} only, not {cfg.algorithm!r}"
                )
    for name in (
        "epochs",
        "batch_size",
        "eval_batch_size",
        "probe_batch_size",
        "step_size",
        "feedback_warmup_factor",
    ):
        _number(name, getattr(cfg, name), integer=True, minimum=1, maximum=MAX_ITERATIONS)
    for name in (
        "max_steps",
        "train_subset",
        "test_subset",
        "t_max",
        "threads",
        "log_every",
        "checkpoint_every",
    ):
        _number(name, getattr(cfg, name), integer=True, minimum=1, allow_none=True)
    _number("seed", cfg.seed, integer=True, minimum=0, maximum=2**63 - 1)  # torch's seeds
    _number("feedback_warmup_steps", cfg.feedback_warmup_steps, integer=True, minimum=0)
    _number("feedback_only_steps", cfg.feedback_only_steps, integer=True, minimum=0)
    if cfg.feedback_only_steps and cfg.algorithm == "bp":
        raise ConfigError(
            f"feedback_only_steps ({cfg.feedback_only_steps}) trains feedback weights "
            "before the forward weights; bp has none: use 0 with bp"
        )
    _number("feedback_memory_mb", cfg.feedback_memory_mb, positive=True)
    _number("lr", cfg.lr, minimum=0, allow_none=True)
    for name in ("weight_decay", "eta_min", "gamma"):
        _number(name, getattr(cfg, name), minimum=0)
    _number("beta", cfg.beta, positive=True, maximum=MAX_BETA)
    for name in ("momentum", "feedback_momentum"):
        _number(name, getattr(cfg, name), minimum=0)
        if getattr(cfg, name) >= 1:
            raise ConfigError(f"{name} must be in [0, 1), got {getattr(cfg, name)!r}")
    if not isinstance(cfg.progress, bool):
        raise ConfigError(f"progress must be true or false, got {cfg.progress!r}")
    if cfg.augment is not None and not isinstance(cfg.augment, bool):
        raise ConfigError(f"augment must be true or false, got {cfg.augment!r}")
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        raise ConfigError(f"data_dir {cfg.data_dir!r} is not an existing folder")
    if not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device {cfg.device!r} asked for, but torch sees no CUDA device")
