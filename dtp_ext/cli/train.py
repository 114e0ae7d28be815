"""`dtp-ext train` (also `python -m dtp_ext.train`): its options (generated from TrainConfig's
fields, options.py), how a preset or file, the options and a resumed run's checkpoint make the
configuration, and the run with its exit codes (0, 1 diverged, 2 bad option, 130/143 stopped
by a signal)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from pathlib import Path

from dtp_ext.train import checkpoint as ckpt
from dtp_ext.train import distributed, interrupt, outdir
from dtp_ext.train.catalog import DEFAULT_MODEL, MODELS
from dtp_ext.train.config import (
    DEFAULT_LR,
    RESUMABLE,
    ConfigError,
    TrainConfig,
    load_config_file,
    merge,
)
from dtp_ext.train.datasets import DatasetNotFound
from dtp_ext.train.events import event_files
from dtp_ext.train.presets import PRESETS
from dtp_ext.train.resolve import resolve
from dtp_ext.train.runner import OUTPUTS, Run, TrainingDiverged

from .formatting import RawHelpFormatter
from .options import add_options, given

# The first paragraph is filled to the others' width once its values are in.
EPILOG = """\
With no options: L-DRL on the MNIST shipped with dtp_ext (60,000 training images, one epoch, \
batch {batch_size}), the small conv net {model} ({about}), forward SGD lr {lr:g} momentum \
{momentum:g}, feedback K={iterations}, noise {noise}, feedback lr {feedback_lr}, on the CPU: \
about 3-4 minutes on 2 cores; it prints the test accuracy and the per-layer alignment angles. \
Add --max-steps 50 for a smoke run of a few seconds.

Learning rates are in this library's gradient units: for ldrl/dtp/tp/drl, lr = beta x the
paper's lr (0.7 x 0.05 = 0.035 on CIFAR-10) and weight_decay = paper's / beta; bp uses the
paper's values. Per-layer options take one value or a comma list with one entry per trained
feedback block (every DTP block after the first, forward order).

Presets (--config NAME): {presets}.
A --config FILE is YAML or JSON whose keys are these options (with _ or -), e.g.
  dataset: cifar10
  feedback_iterations: [20, 30, 35, 55, 20]
Options given on the command line override the preset or file.

Outputs in --out: config.json (the resolved options, written first; --config OUT/config.json
repeats the run), metrics.jsonl (one line per epoch), steps.jsonl (a line after the first
step, then every --log-every steps), TensorBoard event files (the same numbers; when tensorboard
is installed, unless --no-tensorboard), summary.json, accuracy.png, alignment.png and
checkpoint.pt (every epoch, every --checkpoint-every steps, and when --max-steps or a signal
stops a run mid-epoch); --resume --out DIR continues it, bitwise identically on the CPU with
the same --threads. Ctrl-C (SIGINT) or SIGTERM stops at the end of the current step, saves the
checkpoint and exits with 130 / 143. One run at a time may write a folder (OUT/.lock).

Several processes or GPUs: torchrun --nproc_per_node N -m dtp_ext.train [options] (gloo on
the CPU; with --device cuda, nccl and cuda:LOCAL_RANK per process). --batch-size stays the
global batch: each process trains on its 1/N of it, so steps per epoch and lr mean what they
mean in one process. Forward gradients are averaged over all processes every step, feedback
weights stay identical (--feedback-sync); rank 0 writes the outputs; --resume works the same way.
"""


def _slashed(values) -> str:
    """[20, 20] -> '20'; [0.2, 0.08] -> '0.2/0.08'."""
    return "/".join(f"{v:g}" for v in (values[:1] if len(set(values)) == 1 else values))


def epilog() -> str:
    """The help's closing text, its default run read from TrainConfig and the model catalog."""
    defaults = TrainConfig()
    model = DEFAULT_MODEL[defaults.dataset]
    iterations, noise, lr = MODELS[model].feedback_defaults(defaults.algorithm)
    text = EPILOG.format(
        batch_size=defaults.batch_size,
        model=model,
        about=MODELS[model].about,
        lr=DEFAULT_LR[defaults.algorithm],
        momentum=defaults.momentum,
        iterations=_slashed(iterations),
        noise=_slashed(noise),
        feedback_lr=_slashed(lr),
        presets=", ".join(sorted(PRESETS)),
    )
    first, rest = text.split("\n\n", 1)
    return textwrap.fill(first, width=92) + "\n\n" + rest


def _run_options(group):
    group.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )
    group.add_argument(
        "--overwrite", action="store_true", help="start again in an --out that already holds a run"
    )


def add_parser(sub):
    """The `train` subcommand on the subparsers `sub` of the top-level parser."""
    p = sub.add_parser(
        "train",
        help="train a network with L-DRL or a baseline",
        description="Train a network with L-DRL (or bp, dtp, tp, drl) and log how its "
        "feedback weights and updates align with backprop.",
        epilog=epilog(),
        formatter_class=RawHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--config",
        metavar="NAME|FILE",
        help="a preset name (see below) or a YAML/JSON file of options",
    )
    add_options(p, TrainConfig, after={"out": _run_options})
    return p


def _config_layer(name: str) -> dict:
    if name in PRESETS:
        return dict(PRESETS[name])
    path = Path(name)
    if path.is_file():
        return load_config_file(path)
    raise ConfigError(
        f"--config {name!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
        "nor an existing YAML/JSON file"
    )


def _resumed_config(args: argparse.Namespace, options: dict):
    """(configuration, checkpoint state, checkpoint path) of --resume --out DIR."""
    if "out" not in options:
        raise ConfigError("--resume needs --out DIR (the run to continue)")
    path = Path(options["out"]) / ckpt.CHECKPOINT_NAME
    state = ckpt.load(Path(options["out"]))
    if state is None:
        raise ConfigError(f"--resume: no {ckpt.CHECKPOINT_NAME} in {options['out']}")
    saved = ckpt.saved_config(state, path)
    changed = [
        f"--{k.replace('_', '-')} (saved {getattr(saved, k)!r}, given {v!r})"
        for k, v in sorted(options.items())
        if k not in RESUMABLE | {"out"} and getattr(saved, k) != v
    ]
    if "config" in args or changed:
        raise ConfigError(
            f"--resume continues the configuration saved in {path} ({saved.algorithm} on "
            f"{saved.dataset}, model {saved.model}); only {sorted(RESUMABLE)} may change, "
            f"got {', '.join(changed) or '--config'}"
        )
    # --max-steps stops one invocation; a resume without it runs to the last epoch. The run
    # continues in --out even if the folder was moved since (the saved config names the old one).
    keep = {
        "max_steps": None,
        "out": options["out"],
        **{k: v for k, v in options.items() if k in RESUMABLE},
    }
    return resolve(dataclasses.replace(saved, **keep)), state, path


def run(args: argparse.Namespace) -> int:
    """Runs `dtp-ext train` as parsed by `add_parser`; returns the exit code."""
    options = given(args, TrainConfig)
    created, lock = False, None
    main_rank = distributed.rank_and_world()[0] == 0  # it alone writes --out, so it locks it
    try:
        if getattr(args, "resume", False):  # every rank reads the same (rank 0's) checkpoint
            if "out" in options:
                outdir.check(options["out"])
                if main_rank and Path(options["out"]).is_dir():
                    lock = outdir.RunLock(options["out"]).acquire()  # before reading the checkpoint
            cfg, state, path = _resumed_config(args, options)
        else:
            layers = [_config_layer(args.config)] if "config" in args else []
            cfg = resolve(
                merge(*layers, options, source=f"--config {getattr(args, 'config', '')}".strip())
            )
            outdir.check(cfg.out)
            if main_rank:
                lock = outdir.RunLock(cfg.out).acquire()
            # Nothing a run writes may replace a file already there unless asked: the user's
            # own files, or the only record of an earlier run that stopped before a checkpoint.
            existing = [n for n in (*OUTPUTS, ckpt.CHECKPOINT_NAME) if (Path(cfg.out) / n).exists()]
            existing += [p.name for p in event_files(Path(cfg.out))]
            if existing and not getattr(args, "overwrite", False):
                resume = (
                    "pass --resume to continue it or --overwrite to start again"
                    if ckpt.CHECKPOINT_NAME in existing
                    else "choose another --out, or pass --overwrite to replace them"
                )
                raise ConfigError(
                    f"{cfg.out} already holds {', '.join(existing)}, which this run would "
                    f"overwrite; {resume}"
                )
            state = None
        created = distributed.init_from_env(cfg.device)
        with interrupt.stop_signals(announce=main_rank):
            run = Run(cfg)
            if state is not None:
                run.restore(state, source=path)
            run.train()
    except (ConfigError, DatasetNotFound, ckpt.CheckpointError) as exc:
        rank, world = distributed.rank_and_world()
        print(
            f"dtp-ext train{f' [rank {rank}/{world}]' if world > 1 else ''}: error: {exc}",
            file=sys.stderr,
        )
        return 2
    except interrupt.Interrupted as exc:  # every rank stopped after the same step: rank 0 says it
        if distributed.rank_and_world()[0] == 0:
            print(f"dtp-ext train: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the training loop could take it over
        print(
            "dtp-ext train: interrupted (SIGINT) before training started; nothing was saved",
            file=sys.stderr,
        )
        return 130
    except TrainingDiverged as exc:  # every rank agrees on it: rank 0 says it
        if distributed.rank_and_world()[0] == 0:
            print(f"dtp-ext train: diverged: {exc}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()
        if created:
            distributed.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dtp_ext.train [options]`, the same as `dtp-ext train [options]`."""
    parser = argparse.ArgumentParser(prog="dtp-ext")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)]))
