"""TrainConfig: every option of `dtp-ext train`, how the defaults resolve, and validation.

Each field is declared once, with `option(default, help, ...)`: the `dtp-ext train` command
line is generated from these fields (dtp_ext/cli/options.py: the spelling `--name-with-dashes`,
the type from the annotation, the help and its default).

Options come from three layers, later ones winning: the defaults below, a preset or a YAML/JSON
file (`--config`), then the command line. Options left as None are resolved from the dataset,
the model and the algorithm (see `resolve`), so `--dataset cifar10` alone picks SimpleVGG with
the paper's per-layer feedback settings instead of the MNIST ones.

Forward learning rates are in this library's gradient units (docs/maths.md §3): for the DTP algorithms
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

from .catalog import DEFAULT_MODEL, MODELS
from .datasets import INFO
from .errors import ConfigError

ALGORITHMS = ("bp", "ldrl", "dtp", "tp", "drl")
DATASETS = ("mnist", "fashion-mnist", "cifar10", "imagenet32")
SCHEDULERS = ("cosine", "step", "none")
FEEDBACK_SYNCS = ("gradients", "weights")
DRL_VARIANTS = ("p", "s")  # algorithms/drl.py; the first is the default
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # precision.py; auto: resolve picks
MIXED_PRECISION_ALGORITHMS = ("bp", "ldrl")  # the others train in float32 only
TARGET_ALGORITHMS = ("ldrl", "dtp", "tp", "drl")  # forward lr in gradient units (× beta)

# Forward lr when none is given. ldrl/dtp: 0.01 in gradient units (docs/maths.md §14 "Stability"), and
# bp the same, so that L-DRL with perfect feedback would take exactly BP's steps (BP at 0.05
# was unstable on the MNIST conv net: 83% after one epoch). tp and drl move hidden layers by
# G(t) or Q(t - h), much larger than backprop's step with untrained feedback, and diverge at
# 0.01 on MNIST. The paper presets set their own lrs.
DEFAULT_LR = {"bp": 0.01, "ldrl": 0.01, "dtp": 0.01, "tp": 0.001, "drl": 0.001}

PerLayer = float | list[float] | None

# The --help sections of the options (None: the first, untitled one).
SGD = "forward optimizer (SGD)"
FEEDBACK = "target propagation and feedback training"
LOGGING = "data and logging"


def option(default, help: str, **metadata):
    """A TrainConfig field, which is also a `dtp-ext train` option. `help` says what it does
    (--help adds the default); `metadata` may add `choices`, `metavar`, `group` (its --help
    section), `unset` (what None becomes, shown as the default) and `resumable` (it may differ
    when resuming: it does not change the computation already done). A bool defaulting to True
    is the flag `--no-NAME`, and its help describes that flag."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def by_value(default_of: dict) -> str:
    """{key: value} as 'value1 for key1, key2; value2 for key3', e.g. the lr of each algorithm."""
    keys: dict[Any, list[str]] = {}
    for key, value in default_of.items():
        keys.setdefault(value, []).append(key)
    return "; ".join(
        f"{value:g} for {', '.join(names)}"
        if isinstance(value, float)
        else f"{value} for {', '.join(names)}"
        for value, names in keys.items()
    )


@dataclass
class TrainConfig:
    algorithm: str = option("ldrl", "training rule", choices=ALGORITHMS)
    dataset: str = option("mnist", "mnist: the copy shipped with dtp_ext", choices=DATASETS)
    data_dir: str | None = option(
        None, "folder holding the dataset files (required except for mnist)", metavar="DIR"
    )
    model: str | None = option(
        None,
        "resnet18, vgg11_bn, mobilenet_v2, squeezenet1_1: torchvision's (random weights), "
        "adapted to small images and converted (bp and ldrl only; needs torchvision)",
        choices=tuple(sorted(MODELS)),
        unset=by_value(DEFAULT_MODEL),
    )
    epochs: int = option(1, "passes over the training images", resumable=True)
    max_steps: int | None = option(
        None,
        "stop once the run has N optimizer steps in total, counted from its start (also with "
        "--resume); a checkpoint is written, --resume continues",
        metavar="N",
        resumable=True,
    )
    batch_size: int = option(
        64, "the global batch; under torchrun each of the N processes trains on 1/N of it"
    )
    train_subset: int | None = option(None, "use the first N training images", metavar="N")
    test_subset: int | None = option(None, "use the first N test images", metavar="N")
    seed: int = option(0, "random seed")
    device: str = option(
        "cpu", "cpu, cuda or cuda:N (under torchrun: cuda, each process on cuda:LOCAL_RANK)"
    )
    threads: int | None = option(None, "torch CPU threads", unset="torch's", resumable=True)
    precision: str = option(
        "fp32",
        "fp32; bf16: forward under autocast and the feedback phase in bfloat16; fp16: the same "
        "in float16 with a GradScaler (bp and ldrl); auto: bf16 where the device has native "
        "bfloat16 products (AVX512-BF16/AMX-BF16 CPUs, GPUs of compute capability 8+), else fp32",
        choices=PRECISIONS,
    )
    out: str | None = option(
        None, "output folder", metavar="DIR", unset="runs/<dataset>-<algorithm>-<time>"
    )
    checkpoint_every: int | None = option(
        None,
        "also write the checkpoint every N optimizer steps",
        metavar="N",
        unset="at every epoch's end and when a run stops",
        resumable=True,
    )
    log_every: int | None = option(
        None,
        "a steps.jsonl line every N optimizer steps",
        metavar="N",
        unset="about 20 per run, at most every 50 steps",
        resumable=True,
    )
    # forward optimizer (SGD) and schedule
    lr: float | None = option(None, "learning rate", group=SGD, unset=by_value(DEFAULT_LR))
    momentum: float = option(0.9, "momentum", group=SGD)
    weight_decay: float = option(0.0, "weight decay", group=SGD)
    # cosine holds eta_min after t_max (docs/maths.md §14)
    scheduler: str = option("cosine", "lr schedule, per epoch", choices=SCHEDULERS, group=SGD)
    t_max: int | None = option(
        None,
        "cosine length in epochs; held at eta-min after",
        group=SGD,
        unset="--epochs",
    )
    eta_min: float = option(0.0, "the cosine's last lr", group=SGD)
    step_size: int = option(30, "StepLR period in epochs", group=SGD)
    gamma: float = option(0.1, "StepLR factor", group=SGD)
    # target propagation
    beta: float = option(0.7, "target step size", group=FEEDBACK)
    # per trained block, forward order
    feedback_iterations: PerLayer = option(
        None,
        "feedback iterations per batch, per trained block",
        metavar="K[,K...]",
        group=FEEDBACK,
        unset="the model's",
    )
    feedback_noise: PerLayer = option(
        None, "noise std per block", metavar="S[,S...]", group=FEEDBACK, unset="the model's"
    )
    feedback_lr: PerLayer = option(
        None, "feedback SGD lr per block", metavar="LR[,LR...]", group=FEEDBACK, unset="the model's"
    )
    feedback_momentum: float = option(0.9, "feedback SGD momentum", group=FEEDBACK)
    feedback_warmup_steps: int = option(
        0, "first N steps train the feedback longer", group=FEEDBACK
    )
    feedback_warmup_factor: int = option(1, "iteration multiplier during warm-up", group=FEEDBACK)
    feedback_only_steps: int = option(
        0,
        "the first N optimizer steps train only the feedback weights (forward pass and "
        "feedback iterations, forward weights untouched); they count towards --max-steps and "
        "epochs (not for bp)",
        metavar="N",
        group=FEEDBACK,
    )
    feedback_sync: str = option(
        "gradients",
        "ldrl under torchrun: 'gradients' averages the feedback gradient of every iteration "
        "across processes (one big batch; an all-reduce per iteration), 'weights' averages "
        "feedback weights and momentum once per step. dtp, tp and drl always average theirs "
        "after their feedback phase",
        choices=FEEDBACK_SYNCS,
        group=FEEDBACK,
    )
    feedback_memory_mb: float = option(
        256.0,
        "ldrl, dtp, tp: extra memory one block's feedback loop may use to batch its noisy "
        "forward passes across iterations (smaller is slower, never different; docs/memory.md)",
        metavar="MB",
        group=FEEDBACK,
    )
    penultimate_target: str | None = option(
        None,
        "dtp and tp: the last hidden block's target through the output block's feedback, "
        "'feedback' (docs/maths.md §10), or by a gradient step through the output block, 'gradient' "
        "(Lee et al. 2015)",
        choices=PENULTIMATE_TARGETS,
        group=FEEDBACK,
        unset=PENULTIMATE_TARGETS[0],
    )
    drl_variant: str | None = option(
        None,
        "drl: 'p' trains Q on every batch after the forward gradients; 's' alternates whole "
        "epochs, Q only (even epochs: 1st, 3rd, ...) then the forward weights only, so --epochs "
        "counts both kinds",
        choices=DRL_VARIANTS,
        group=FEEDBACK,
        unset=DRL_VARIANTS[0],
    )
    # data pipeline and logging
    augment: bool | None = option(
        None,
        "random crop (pad 4, edge) + flip",
        group=LOGGING,
        unset="on for " + ", ".join(name for name, info in INFO.items() if info.augment),
    )
    eval_batch_size: int = option(1000, "images per test batch", group=LOGGING)
    probe_batch_size: int = option(128, "fixed batch for the update-vs-BP angles", group=LOGGING)
    progress: bool = option(True, "no tqdm bars", group=LOGGING, resumable=True)
    tensorboard: bool = option(
        True,
        "no TensorBoard event files (written beside the JSONL when tensorboard is installed)",
        group=LOGGING,
        resumable=True,
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
RESUMABLE = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resumable")}


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
    for field in dataclasses.fields(cfg):  # None: resolved later (model) or checked below
        if "choices" in field.metadata and field.default is not None:
            check_choice(field.name, getattr(cfg, field.name), field.metadata["choices"])
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
    for name in ("progress", "tensorboard"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(cfg, name)!r}")
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
