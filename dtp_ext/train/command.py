"""The command line of `dtp-ext train` (also `python -m dtp_ext.train`): its options, how a
preset or file, the options and a resumed run's checkpoint make the configuration, and the run
with its exit codes (0, 1 diverged, 2 bad option, 130/143 stopped by a signal).
dtp_ext/cli.py holds the top-level `dtp-ext` parser and hands `train` to `add_parser`/`run`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

DEFAULT_RUN = """\
With no options: L-DRL on the MNIST shipped with dtp_ext (60,000 training images, one epoch,
batch 64), the small conv net mnist-convnet (conv5x5 16 ELU pool2, conv5x5 32 ELU pool2,
linear), forward SGD lr 0.01 momentum 0.9, feedback K=20, noise 0.2/0.08, feedback lr
1e-3/0.18, on the CPU: about 3-4 minutes on 2 cores; it prints the test accuracy and the
per-layer alignment angles. Add --max-steps 50 for a smoke run of a few seconds.

Learning rates are in this library's gradient units: for ldrl/dtp/tp/drl, lr = beta x the
paper's lr (0.7 x 0.05 = 0.035 on CIFAR-10) and weight_decay = paper's / beta; bp uses the
paper's values. Per-layer options take one value or a comma list with one entry per trained
feedback block (every DTP block after the first, forward order).

Presets (--config NAME): {presets}.
A --config FILE is YAML or JSON whose keys are these options (with _ or -), e.g.
  dataset: cifar10
  feedback_iterations: [20, 30, 35, 55, 20]
Options given on the command line override the preset or file.

Outputs in --out: metrics.jsonl (one line per epoch), steps.jsonl (a line every --log-every
steps), summary.json, accuracy.png, alignment.png and checkpoint.pt (every epoch, every
--checkpoint-every steps, and when --max-steps or a signal stops a run mid-epoch); --resume
--out DIR continues it, bitwise identically on the CPU with the same --threads. Ctrl-C
(SIGINT) or SIGTERM stops at the end of the current step, saves the checkpoint and exits with
130 / 143. One run at a time may write a folder (OUT/.lock).

Several processes or GPUs: torchrun --nproc_per_node N -m dtp_ext.train [options] (gloo on
the CPU; with --device cuda, nccl and cuda:LOCAL_RANK per process). --batch-size stays the
global batch: each process trains on its 1/N of it, so steps per epoch and lr mean what they
mean in one process. Forward gradients are averaged over all processes every step, feedback
weights stay identical (--feedback-sync); rank 0 writes the outputs; --resume works the same way.
"""


def _numbers(text: str):
    """'20' -> 20.0; '20,30,35' -> [20.0, 30.0, 35.0] (per-layer options)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or a comma-separated list of numbers, got {text!r}"
        ) from None
    values = [int(v) if v.is_integer() else v for v in values]
    return values[0] if len(values) == 1 else values


def add_parser(sub):
    """The `train` subcommand on the subparsers `sub` of the top-level parser."""
    from .catalog import MODELS
    from .config import (
        ALGORITHMS,
        DATASETS,
        DRL_VARIANTS,
        FEEDBACK_SYNCS,
        PENULTIMATE_TARGETS,
        PRECISIONS,
        SCHEDULERS,
    )
    from .presets import PRESETS

    p = sub.add_parser(
        "train",
        help="train a network with L-DRL or a baseline",
        description="Train a network with L-DRL (or bp, dtp, tp, drl) and log how its "
        "feedback weights and updates align with backprop.",
        epilog=DEFAULT_RUN.format(presets=", ".join(sorted(PRESETS))),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    a = p.add_argument
    a(
        "--config",
        metavar="NAME|FILE",
        help="a preset name (see below) or a YAML/JSON file of options",
    )
    a("--algorithm", choices=ALGORITHMS, help="training rule (default ldrl)")
    a("--dataset", choices=DATASETS, help="default mnist (shipped with dtp_ext)")
    a(
        "--data-dir",
        metavar="DIR",
        help="folder holding the dataset files (required except for mnist)",
    )
    a(
        "--model",
        choices=sorted(MODELS),
        help="default: mnist-convnet for (fashion-)mnist, simplevgg otherwise; "
        "resnet18, vgg11_bn, mobilenet_v2, squeezenet1_1: torchvision's "
        "(random weights), adapted to small images and converted "
        "(bp and ldrl only; needs torchvision)",
    )
    a("--epochs", type=int, help="default 1")
    a(
        "--max-steps",
        type=int,
        metavar="N",
        help="stop once the run has N optimizer steps in total, counted "
        "from its start (also with --resume); a checkpoint is "
        "written, --resume continues",
    )
    a(
        "--batch-size",
        type=int,
        help="the global batch (default 64); under torchrun each of the N "
        "processes trains on 1/N of it",
    )
    a("--train-subset", type=int, metavar="N", help="use the first N training images")
    a("--test-subset", type=int, metavar="N", help="use the first N test images")
    a("--seed", type=int, help="default 0")
    a(
        "--device",
        help="cpu (default), cuda or cuda:N (under torchrun: cuda, each process on "
        "cuda:LOCAL_RANK)",
    )
    a("--threads", type=int, help="torch CPU threads (default: torch's)")
    a(
        "--precision",
        choices=PRECISIONS,
        help="fp32 (default); bf16: forward under autocast and the "
        "feedback phase in bfloat16; fp16: the same in float16 "
        "with a GradScaler (bp and ldrl); auto: bf16 where the device has native bfloat16 "
        "products (AVX512-BF16/AMX-BF16 CPUs, GPUs of compute capability 8+), else fp32",
    )
    a("--out", metavar="DIR", help="output folder (default runs/<dataset>-<algorithm>-<time>)")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--overwrite", action="store_true", help="start again in an --out that already holds a run")
    a(
        "--checkpoint-every",
        type=int,
        metavar="N",
        help="also write the checkpoint every N optimizer steps "
        "(default: at every epoch's end and when a run stops)",
    )
    a(
        "--log-every",
        type=int,
        metavar="N",
        help="a steps.jsonl line every N optimizer steps (default: "
        "about 20 per run, at most every 50 steps)",
    )
    g = p.add_argument_group("forward optimizer (SGD)")
    g.add_argument(
        "--lr", type=float, help="default 0.01 for bp, ldrl and dtp, 0.001 for tp and drl"
    )
    g.add_argument("--momentum", type=float, help="default 0.9")
    g.add_argument("--weight-decay", type=float, help="default 0")
    g.add_argument("--scheduler", choices=SCHEDULERS, help="per epoch (default cosine)")
    g.add_argument(
        "--t-max",
        type=int,
        help="cosine length in epochs (default: --epochs); held at eta-min after",
    )
    g.add_argument("--eta-min", type=float, help="default 0")
    g.add_argument("--step-size", type=int, help="StepLR period in epochs (default 30)")
    g.add_argument("--gamma", type=float, help="StepLR factor (default 0.1)")
    g = p.add_argument_group("target propagation and feedback training")
    g.add_argument("--beta", type=float, help="target step size (default 0.7)")
    g.add_argument(
        "--feedback-iterations",
        type=_numbers,
        metavar="K[,K...]",
        help="feedback iterations per batch, per trained block (default: the model's)",
    )
    g.add_argument(
        "--feedback-noise", type=_numbers, metavar="S[,S...]", help="noise std per block"
    )
    g.add_argument(
        "--feedback-lr", type=_numbers, metavar="LR[,LR...]", help="feedback SGD lr per block"
    )
    g.add_argument("--feedback-momentum", type=float, help="default 0.9")
    g.add_argument(
        "--feedback-warmup-steps", type=int, help="first N steps train the feedback longer"
    )
    g.add_argument("--feedback-warmup-factor", type=int, help="iteration multiplier during warm-up")
    g.add_argument(
        "--feedback-only-steps",
        type=int,
        metavar="N",
        help="the first N optimizer steps train only the feedback weights (forward pass and "
        "feedback iterations, forward weights untouched); they count towards --max-steps "
        "and epochs (default 0; not for bp)",
    )
    g.add_argument(
        "--feedback-sync",
        choices=FEEDBACK_SYNCS,
        help="ldrl under torchrun: 'gradients' (default) averages the feedback gradient of "
        "every iteration across processes (one big batch; an all-reduce per iteration), "
        "'weights' averages feedback weights and momentum once per step. dtp, tp and "
        "drl always average theirs after their feedback phase",
    )
    g.add_argument(
        "--feedback-memory-mb",
        type=float,
        metavar="MB",
        help="ldrl, dtp, tp: extra memory one block's feedback loop may use to batch its "
        "noisy forward passes across iterations (default 256; smaller is slower, "
        "never different; docs/memory.md)",
    )
    g.add_argument(
        "--penultimate-target",
        choices=PENULTIMATE_TARGETS,
        help="dtp and tp: the last hidden block's target through the output block's "
        "feedback, 'feedback' (default, SPEC §5), or by a gradient step through the "
        "output block, 'gradient' (Lee et al. 2015)",
    )
    g.add_argument(
        "--drl-variant",
        choices=DRL_VARIANTS,
        help="drl: 'p' (default) trains Q on every batch after the forward gradients; 's' "
        "alternates whole epochs, Q only (even epochs: 1st, 3rd, ...) then the forward "
        "weights only, so --epochs counts both kinds",
    )
    g = p.add_argument_group("data and logging")
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="random crop (pad 4, edge) + flip; default on for cifar10/imagenet32",
    )
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument(
        "--probe-batch-size", type=int, help="fixed batch for the update-vs-BP angles (default 128)"
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    return p


def _config_layer(name: str) -> dict:
    from .config import ConfigError, load_config_file
    from .presets import PRESETS

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
    from . import checkpoint as ckpt
    from .config import RESUMABLE, ConfigError
    from .resolve import resolve

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
    from . import checkpoint as ckpt
    from . import distributed, interrupt, outdir
    from .config import ConfigError, merge
    from .datasets import DatasetNotFound
    from .resolve import resolve
    from .runner import OUTPUTS, Run, TrainingDiverged

    options = {
        k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "overwrite")
    }
    created, lock = False, None
    main_rank = (
        distributed.rank_and_world()[0] == 0
    )  # rank 0 alone writes --out, so it alone locks it
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
