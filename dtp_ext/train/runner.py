"""The training loop of `dtp-ext train`: data, model, algorithm, optimizer, logs, checkpoints.

Determinism: the global RNG is seeded once, then used only by model init and the feedback
noise; batch order and augmentation come from their own (seed, epoch, step) generators
(batches.py). A checkpoint holds the global RNG state (of every rank, under several
processes), so stopping after any step and resuming replays exactly the computation an
uninterrupted run does.

Under torchrun (distributed.py) each rank trains on its shard of every global batch, the
forward gradients and the feedback weights are kept identical on every rank, and rank 0 alone
writes files, prints and shows the progress bar.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dtp_ext
from dtp_ext import ops

from . import checkpoint as ckpt
from . import distributed, interrupt
from .algorithms import FeedbackSettings, make_algorithm
from .batches import batch_count, normalise, shard, steps_per_epoch, train_batches
from .catalog import build_model, model_spec
from .config import ConfigError, TrainConfig
from .datasets import INFO, load_split
from .evaluation import RunningTotals, batch_totals, evaluate
from .events import EventLog, event_files
from .plots import write_plots
from .precision import MAX_CONSECUTIVE_OVERFLOWS, Precision
from .probe import layer_metrics
from .resolve import lr_units_note


class TrainingDiverged(RuntimeError):
    pass


# What a run writes in --out (besides the checkpoint and the TensorBoard event files, see
# events.py); a fresh run removes stale copies.
CONFIG_NAME = "config.json"  # the resolved options, written as the run starts
OUTPUTS = (
    CONFIG_NAME,
    "metrics.jsonl",
    "steps.jsonl",
    "summary.json",
    "accuracy.png",
    "alignment.png",
)


def default_log_every(planned_steps: int) -> int:
    """steps.jsonl interval when --log-every is not given: about 20 lines per run, at most
    every 50 steps (so a 5-step smoke run logs every step)."""
    return max(1, min(50, planned_steps // 20))


def make_scheduler(optimizer, cfg: TrainConfig):
    base = cfg.lr
    if cfg.scheduler == "cosine":
        # Cosine to eta_min over t_max epochs, then held there (the paper's code rises again
        # after t_max, SPEC §9).
        def factor(epoch):
            e = min(epoch, cfg.t_max)
            lr = cfg.eta_min + (base - cfg.eta_min) * (1 + math.cos(math.pi * e / cfg.t_max)) / 2
            return lr / base if base > 0 else 1.0
    elif cfg.scheduler == "step":

        def factor(epoch):
            return cfg.gamma ** (epoch // cfg.step_size)
    else:

        def factor(epoch):
            return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def versions() -> dict[str, str]:
    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "dtp_ext": dtp_ext.__version__,
    }
    try:
        import torchvision

        found["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return found


class Run:
    """One training run. Under an initialised process group of several ranks (torchrun, see
    distributed.py) every rank builds its own Run; --batch-size is the global batch."""

    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg
        self.ctx = ctx = distributed.context(cfg.device)
        self.device = ctx.device
        self.log = log if ctx.main else (lambda *args, **kwargs: None)
        self.out = Path(cfg.out)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.batch_size < ctx.world:
            raise ConfigError(
                f"batch_size {cfg.batch_size} is the global batch, split across "
                f"{ctx.world} processes: it must be at least {ctx.world}"
            )
        distributed.seed_all(cfg.seed)
        self.info = INFO[cfg.dataset]
        self.train_set = load_split(cfg.dataset, cfg.data_dir, "train").subset(cfg.train_subset)
        self.test_set = load_split(cfg.dataset, cfg.data_dir, "test").subset(cfg.test_subset)
        info = self.info
        if ctx.world > 1 and not model_spec(cfg.model).chain:
            raise ConfigError(
                f"model {cfg.model!r} cannot train under several processes yet: its "
                "BatchNorm running statistics would differ from rank to rank; run it "
                "in one process"
            )
        self.model = build_model(cfg.model, info.channels, info.size, info.classes, cfg.beta).to(
            self.device
        )
        feedback = FeedbackSettings(
            cfg.feedback_iterations,
            cfg.feedback_noise,
            cfg.feedback_lr,
            cfg.feedback_momentum,
            cfg.feedback_warmup_steps,
            cfg.feedback_warmup_factor,
            sync=cfg.feedback_sync,
            memory_budget_mb=cfg.feedback_memory_mb,
            feedback_only_steps=cfg.feedback_only_steps,
        )
        self.algorithm = make_algorithm(
            cfg.algorithm,
            self.model,
            feedback,
            (info.channels, info.size, info.size),
            info.classes,
            penultimate_target=cfg.penultimate_target,
            variant=cfg.drl_variant,
        )
        self.precision = Precision(cfg.precision, self.device)
        self.algorithm.use_precision(self.precision)  # not fp32: bp and ldrl only (config)
        distributed.synchronise_algorithm(self.algorithm, ctx)
        if ctx.rank > 0:  # independent feedback noise per rank; rank 0 keeps the 1-process stream
            distributed.seed_all(distributed.rank_seed(cfg.seed, ctx.rank))
        self.named_params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.scheduler = make_scheduler(self.optimizer, cfg)
        probe = self.train_set.subset(cfg.probe_batch_size)
        self.probe = (
            normalise(probe.images.to(self.device), info.mean, info.std),
            probe.labels.to(self.device),
        )
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self._checkpoint_step: int | None = None  # the step of the latest checkpoint on disk
        self.counter = RunningTotals()
        self.window, self.window_steps = (
            RunningTotals(),
            0,
        )  # train metrics since the last steps.jsonl line
        self.elapsed = 0.0
        self.resumed_from: int | None = None
        self.stop_requested = False
        self.events: EventLog | None = None  # rank 0's TensorBoard writer while training
        self.steps_per_epoch = steps_per_epoch(len(self.train_set), cfg.batch_size, ctx.world)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{len(self.train_set)} training images cannot give each of the "
                f"{ctx.world} processes one"
            )
        if cfg.log_every is None:  # resolved once; the checkpoint keeps the value
            planned = cfg.epochs * self.steps_per_epoch
            self.cfg = cfg = dataclasses.replace(
                cfg,
                log_every=default_log_every(
                    planned if cfg.max_steps is None else min(planned, cfg.max_steps)
                ),
            )

    # -- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict:
        """This rank's state; `save` adds every rank's RNG states under several processes."""
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "algorithm": self.algorithm.state_dict(),
            "rng": ckpt.rng_states(),
            "precision": self.precision.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "counter": self.counter.state,
            "window": {"counter": self.window.state, "steps": self.window_steps},
            "feedback_losses": dict(self.algorithm.last_feedback_losses),  # for the logs
            "feedback_quality": self.algorithm.feedback_quality(),  # for the logs
            "elapsed": self.elapsed,
            "world_size": self.ctx.world,
            "threads": torch.get_num_threads(),
        }

    def save(self):
        """Collective under several processes: checks that the ranks agree, then rank 0 writes
        its state plus every rank's RNG states ("rank_rng")."""
        state = self.state()
        rngs = self.ctx.gather(state["rng"])
        self.ctx.check_identical(
            [state[k] for k in ("model", "optimizer", "algorithm", "counter")],
            "weights, optimizer or feedback state",
        )
        if self.ctx.main:
            if self.ctx.world > 1:
                state["rank_rng"] = rngs
            kept = (
                f"the previous checkpoint (step {self._checkpoint_step}) is kept"
                if self._checkpoint_step is not None
                else "there is no earlier checkpoint"
            )
            ckpt.save_atomic(state, self.out / ckpt.CHECKPOINT_NAME, kept=kept)
            self._checkpoint_step = self.global_step

    def restore(self, state: dict, source="the checkpoint"):
        """Continue from `state` (every rank loads the same rank-0 checkpoint). Raises
        CheckpointError, naming `source`, if it does not fit this run's configuration."""
        ckpt.check_compatible(state, self.cfg, source)
        ckpt.check_counters(
            state,
            source,
            self.steps_per_epoch,
            same_world=state.get("world_size", 1) == self.ctx.world,
        )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.algorithm.load_state_dict(state["algorithm"])
            # absent from checkpoints written before --precision (fp32 runs)
            self.precision.load_state_dict(state.get("precision") or {})
            self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
            self.global_step, self.elapsed = int(state["global_step"]), float(state["elapsed"])
            self.counter = RunningTotals(state["counter"])
            window = state.get("window") or {}  # absent from checkpoints of older versions
            self.window, self.window_steps = (
                RunningTotals(window.get("counter")),
                int(window.get("steps", 0)),
            )
            self.algorithm.last_feedback_losses = dict(state.get("feedback_losses") or {})
            self.algorithm.last_feedback_quality = dict(state.get("feedback_quality") or {})
            self._restore_rng(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise ckpt.CheckpointError(
                f"{source}: its saved state does not fit a {self.cfg.algorithm} run of "
                f"{self.cfg.model} ({type(exc).__name__}: {str(exc).strip()[:400]})"
            ) from None
        self.resumed_from = self._checkpoint_step = self.global_step
        saved_threads = state.get("threads", ckpt.saved_config(state, source).threads)
        if not self.device.startswith("cuda") and saved_threads not in (
            None,
            torch.get_num_threads(),
        ):
            self.log(
                f"note: the checkpoint was written with {saved_threads} CPU thread(s), this run uses "
                f"{torch.get_num_threads()}: it continues, but is not bitwise identical to an "
                "uninterrupted run (float sums are split differently); resume with "
                f"--threads {saved_threads} for that"
            )
        if self.ctx.main:
            # Records past the checkpoint (a crash between the log and the save) are dropped.
            self.records = [r for r in self._read_records() if r["epoch"] <= self.epoch]
            self._write_records()
            self.step_records = [
                r for r in self._read_records("steps.jsonl") if r["step"] <= self.global_step
            ]
            self._write_records("steps.jsonl", self.step_records)

    def _restore_rng(self, state: dict):
        per_rank = state.get("rank_rng") or [state["rng"]]
        if self.ctx.rank < len(per_rank):
            ckpt.set_rng_states(per_rank[self.ctx.rank])
        else:  # more processes than the run that wrote the checkpoint: fresh, reproducible streams
            distributed.seed_all(
                distributed.rank_seed(self.cfg.seed, self.ctx.rank, self.global_step)
            )
        if len(per_rank) != self.ctx.world:
            self.log(
                f"note: the checkpoint was written by {len(per_rank)} process(es), this run has "
                f"{self.ctx.world}: the data is the same global batches, but the feedback noise "
                "(and the float summation order) differ from an uninterrupted run"
            )

    def _read_records(self, name="metrics.jsonl"):
        """The records of a log the run wrote, for --resume. These logs are not needed to
        resume: a damaged line (cut short, not a JSON object, not UTF-8, no step/epoch) is
        skipped and named, never a traceback."""
        path = self.out / name
        if not path.exists():
            return []
        key = "epoch" if name == "metrics.jsonl" else "step"
        records, damaged = [], []
        for number, raw in enumerate(path.read_bytes().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                record = None
            if isinstance(record, dict) and type(record.get(key)) is int:
                records.append(record)
            else:
                damaged.append(number)
        if damaged:
            self.log(
                f"note: {name}: skipped damaged line(s) {', '.join(map(str, damaged))} (not a "
                f"JSON object with an integer '{key}'); the run continues without them"
            )
        return records

    def _write_records(self, name="metrics.jsonl", records=None):
        records = self.records if records is None else records
        path = self.out / name
        if not records and not path.exists():
            return  # no empty files
        with open(path, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    def _log_step(self, kind: str | None = None, alignment: dict | None = None):
        """A steps.jsonl line (rank 0), and its scalars in the TensorBoard event file: train
        metrics over the steps since the previous regular line, the lr, the last feedback
        losses and the alignment on the probe batch. `kind` "epoch" marks an epoch's end;
        "stop" a run stopping (--max-steps, a signal), which leaves the window running so that
        the regular lines match an uninterrupted run."""
        if self.ctx.main:
            record = {
                "step": self.global_step,
                "epoch": self.epoch + 1,
                "epoch_step": self.step_in_epoch,
                "steps": self.window_steps,
                **self.window.means("train"),
                "lr": self.optimizer.param_groups[0]["lr"],
                "feedback_loss": dict(self.algorithm.last_feedback_losses),
                "feedback_quality": self.algorithm.feedback_quality(),
                **(alignment if alignment is not None else self._alignment()),
                "time_s": self.elapsed
                + (time.perf_counter() - self._started if self._started is not None else 0.0),
            }
            if kind:
                record["kind"] = kind
            self.step_records.append(record)
            with open(self.out / "steps.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.events is not None:
                self.events.write(record)
        if kind != "stop":
            self.window, self.window_steps = RunningTotals(), 0

    def _alignment(self) -> dict:
        """layer_metrics on the probe batch; {} when the weights have gone non-finite (the step
        guard then stops the run with the reason; a log line must not crash it first)."""
        try:
            return layer_metrics(self.algorithm, *self.probe)
        except (ops.NonFiniteInputError, FloatingPointError):
            return {}

    def _stop(self, why: str, signum: int | None = None):
        """Mid-epoch stop (--max-steps or a signal): checkpoint, a steps.jsonl line, plots."""
        self.save()  # --resume continues at the next step
        if self.window_steps:
            self._log_step("stop")
        self._plot()
        where = (
            f"step {self.global_step} (epoch {self.epoch + 1}, step {self.step_in_epoch} of "
            f"{self.steps_per_epoch})"
        )
        if signum is None:
            self.log(f"stopped after {where} ({why}); checkpoint in {self.out}")
            return
        self.ctx.barrier()  # every rank leaves once the checkpoint is written
        more = f" --max-steps {self.cfg.max_steps}" if self.cfg.max_steps is not None else ""
        raise interrupt.Interrupted(
            signum,
            f"interrupted by {interrupt.name(signum)} at {where}; checkpoint "
            f"saved in {self.out}; continue with: dtp-ext train --resume "
            f"--out {self.out}{more}",
        )

    def _signal_agreed(self) -> int | None:
        """The signal any rank received (every rank gets the same answer), or None."""
        signum = interrupt.requested()
        if not self.ctx.any(signum is not None):
            return None
        return signum or interrupt.signal.SIGTERM  # another rank's signal: its usual meaning

    def _plot(self):
        if self.ctx.main:
            write_plots(
                self.records,
                self.out,
                f"{self.cfg.dataset} {self.cfg.model} {self.cfg.algorithm}",
                steps=self.step_records,
            )

    # -- training -------------------------------------------------------------------------
    def _train_step(self, x, y, global_count: int | None = None):
        """One optimizer step on this rank's shard (x, y) of a global batch of `global_count`
        images. Refused, with the forward weights and optimizer state untouched, if the loss or
        any forward gradient is not finite on any rank (all ranks agree, none hangs)."""
        self.optimizer.zero_grad(set_to_none=True)
        cause = ""
        try:
            loss, logits = self.algorithm.train_step(x, y, self.global_step)
        except (FloatingPointError, ops.NonFiniteInputError) as exc:
            # FeedbackTrainer refuses non-finite feedback steps; a fused op refuses a non-finite
            # input (e.g. the DTP backward of a NaN loss) before any gradient is written.
            loss, logits, cause = None, None, f" ({exc})"
        params = [p for _, p in self.named_params]
        totals = self.ctx.step_totals(
            params,
            batch_totals(loss, logits, y),
            y.shape[0] / (global_count or y.shape[0]),
            stop=interrupt.requested() is not None,
        )
        self.stop_requested = totals.stop  # every rank stops after the same step
        value = totals.loss_sum / max(totals.seen, 1)
        lr = self.optimizer.param_groups[0]["lr"]
        where = f"at step {self.global_step} (epoch {self.epoch + 1})"
        if totals.bad_loss:
            raise TrainingDiverged(
                f"the training loss became {value}{cause} {where}; lower the forward lr (now {lr:g}) "
                "or train the feedback weights longer first (feedback_only_steps, feedback_warmup_steps / "
                "feedback_warmup_factor)"
            )
        if totals.bad_grad and self.precision.scaler is None:
            # the gradients are the reduced ones: every rank names the same
            bad = [
                n
                for n, p in self.named_params
                if p.grad is not None and not bool(torch.isfinite(p.grad).all())
            ]
            raise TrainingDiverged(
                f"a forward gradient became non-finite ({', '.join(bad) or 'on another rank'}) {where} "
                f"while the loss was {value:g}; the step was refused (forward weights and optimizer "
                f"state unchanged); lower the forward lr (now {lr:g}) or the feedback lr"
            )
        if not self.precision.step(self.optimizer, overflow=totals.bad_grad):
            # fp16: GradScaler skipped the step and halved the scale; the batch still counts
            if self.precision.consecutive_overflows >= MAX_CONSECUTIVE_OVERFLOWS:
                raise TrainingDiverged(
                    f"fp16: the scaled gradients overflowed {MAX_CONSECUTIVE_OVERFLOWS} steps in a row "
                    f"{where} (loss scale now {self.precision.scaler.get_scale():g}); the forward "
                    f"weights are unchanged since; train with --precision bf16 or fp32, or lower "
                    f"the forward lr (now {lr:g})"
                )
        self.counter.add_totals(totals.loss_sum, totals.top1, totals.top5, totals.seen)
        self.window.add_totals(totals.loss_sum, totals.top1, totals.top5, totals.seen)
        self.window_steps += 1
        self.global_step += 1
        return value

    def _end_epoch(self, lr: float, epoch_time: float):
        record = {
            "epoch": self.epoch + 1,
            "step": self.global_step,
            **self.counter.means("train"),
            **self._evaluate(),
        }
        alignment = self._alignment() if self.ctx.main else None
        if self.ctx.main:
            record.update(
                {
                    "lr": lr,
                    "feedback_lr": self.cfg.feedback_lr,  # None: planned (feedback_quality)
                    "feedback_quality": self.algorithm.feedback_quality(),
                    **alignment,
                    "feedback_loss": dict(self.algorithm.last_feedback_losses),
                    "epoch_time_s": epoch_time,
                    "time_s": self.elapsed,
                }
            )
            self.records.append(record)
            self._write_records()
            if self.events is not None:
                self.events.write(record, epoch=True)
        if self.window_steps:
            self._log_step("epoch", alignment)
        with warnings.catch_warnings():
            # A run resumed right at an epoch's end (stopped by a signal after its last step)
            # steps the restored scheduler before any optimizer step of this process: harmless.
            warnings.filterwarnings(
                "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
            )
            self.scheduler.step()
        self.epoch, self.step_in_epoch, self.counter = self.epoch + 1, 0, RunningTotals()
        self.save()
        self._plot()
        return record

    def train(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        self._started = None
        if ctx.main:
            self.out.mkdir(parents=True, exist_ok=True)
            stale = ckpt.remove_stale_temporaries(self.out)
            if stale:
                self.log(f"removed {', '.join(stale)}: a checkpoint save interrupted by a kill")
            if not hasattr(self, "records"):  # a fresh run: no stale outputs of an earlier one
                for name in OUTPUTS:
                    (self.out / name).unlink(missing_ok=True)
                for path in event_files(self.out):
                    path.unlink(missing_ok=True)
                self.records, self.step_records = [], []
        batch = f"batch {cfg.batch_size}"
        if ctx.world > 1:
            p = self._processes()
            batch += (
                f" (global: {'/'.join(map(str, p['per_process_batch_size']))} per process, "
                f"{ctx.world} processes, {ctx.backend}, feedback sync {p['feedback_sync']})"
            )
        self.log(
            f"dtp-ext train: {cfg.algorithm} on {cfg.dataset} ({len(self.train_set)} train / "
            f"{len(self.test_set)} test images), model {cfg.model}, {cfg.epochs} epoch(s) of "
            f"{self.steps_per_epoch} steps, {batch}, {lr_units_note(cfg)}, "
            f"device {self.device}, out {self.out}"
        )
        if self.resumed_from is not None:
            self.log(f"resumed from step {self.global_step} ({self._position()})")
        left = self._nothing_left()
        if left:
            return self._nothing_to_do(left)
        if ctx.main:
            self._start_files()
        try:
            return self._train()
        finally:
            if self.events is not None:
                self.events.close()
                self.events = None

    def _start_files(self):
        """What a run writes before its first step (rank 0): config.json, and the TensorBoard
        event file, holding a resumed run's kept JSONL lines (events.py)."""
        (self.out / CONFIG_NAME).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        if self.cfg.tensorboard:
            self.events = EventLog.open(self.out, self.step_records, self.records, self.log)

    def _train(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        signum = self._signal_agreed()  # received while the data was read
        if signum:
            self._stop("signal", signum)
        stopped = False
        while self.epoch < cfg.epochs and not stopped:
            self.algorithm.epoch = self.epoch  # DRL's "s" variant alternates epochs
            lr = self.optimizer.param_groups[0]["lr"]
            started = self._started = time.perf_counter()
            signum = None
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=self.step_in_epoch,
                disable=not (cfg.progress and ctx.main),
                desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                unit="step",
                dynamic_ncols=True,
            )
            for step, x, y in train_batches(
                self.train_set,
                cfg.batch_size,
                cfg.seed,
                self.epoch,
                self.step_in_epoch,
                self.info.mean,
                self.info.std,
                cfg.augment,
                self.device,
                ctx.rank,
                ctx.world,
            ):
                loss = self._train_step(
                    x, y, batch_count(len(self.train_set), cfg.batch_size, step)
                )
                self.step_in_epoch = step + 1
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss:.3f}",
                    acc=f"{self.counter.means('train')['train_top1']:.1f}%",
                    refresh=False,
                )
                last = self.step_in_epoch == self.steps_per_epoch
                # The run's first step has a line at once, for whoever watches the file; the
                # epoch's end logs its own.
                if (self.global_step % cfg.log_every == 0 or self.global_step == 1) and not last:
                    self._log_step()
                if self.stop_requested:  # a signal on some rank: all ranks agree on this step
                    signum = interrupt.requested() or interrupt.signal.SIGTERM
                    break
                if cfg.max_steps is not None and self.global_step >= cfg.max_steps and not last:
                    stopped = True
                    break
                if (
                    cfg.checkpoint_every
                    and self.global_step % cfg.checkpoint_every == 0
                    and not last
                ):
                    self.save()
            bar.close()
            self.elapsed += time.perf_counter() - started
            self._started = None
            if signum:
                self._stop("signal", signum)  # raises Interrupted
            if stopped:
                self._stop("--max-steps")
            else:
                record = self._end_epoch(lr, time.perf_counter() - started)
                self.log(
                    f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} "
                    f"top-1 {record['train_top1']:.2f}%, test loss {record['test_loss']:.4f} "
                    f"top-1 {record['test_top1']:.2f}%"
                )
                stopped = cfg.max_steps is not None and self.global_step >= cfg.max_steps
                signum = self._signal_agreed()  # received during the evaluation
                if signum:
                    self._stop("signal", signum)
        signum = self._signal_agreed()
        if signum:  # the checkpoint is complete; the final evaluation is left to --resume
            self._stop("signal", signum)
        summary = self.finish()
        if interrupt.requested():
            self.log(
                f"{interrupt.name(interrupt.requested())} received during the final evaluation: the run "
                "had finished, its outputs are complete"
            )
        return summary

    def _position(self) -> str:
        if self.step_in_epoch == 0:
            return f"{self.epoch} of {self.cfg.epochs} epoch(s) done"
        return (
            f"epoch {self.epoch + 1}, {self.step_in_epoch} of its {self.steps_per_epoch} steps done"
        )

    def _nothing_left(self) -> str | None:
        """Why a (resumed) run has no step left to train, or None."""
        cfg = self.cfg
        if self.epoch >= cfg.epochs:
            return (
                f"the run has completed {self.epoch} epoch(s) and --epochs is {cfg.epochs}; pass a larger "
                "--epochs to train further"
            )
        if (
            cfg.max_steps is not None
            and self.global_step >= cfg.max_steps
            and self.step_in_epoch < self.steps_per_epoch
        ):
            return (
                f"the run is at step {self.global_step} and --max-steps {cfg.max_steps} counts the run's "
                "steps from its start, not this invocation's; pass a larger --max-steps, or none to train "
                f"to the end of epoch {cfg.epochs}"
            )
        return None

    def _nothing_to_do(self, why: str) -> dict:
        """A resumed run with no step left: summary.json is rewritten only if it is not this
        step's already (a run stopped by a signal before its final evaluation)."""
        self.log(f"nothing left to do: {why}")
        summary = None
        path = self.out / "summary.json"
        if self.ctx.main and path.exists():
            try:
                summary = json.loads(path.read_text())
            except ValueError:
                summary = None
            if not isinstance(summary, dict) or summary.get("global_step") != self.global_step:
                summary = None
        if self.ctx.any(summary is not None):
            self.log(f"{path} is up to date (step {self.global_step}); nothing was rewritten")
            return summary if summary is not None else {"global_step": self.global_step}
        return self.finish()

    def _processes(self) -> dict:
        """How the run is split across processes (summary.json "processes")."""
        sizes = [
            hi - lo
            for lo, hi in (
                shard(self.cfg.batch_size, r, self.ctx.world) for r in range(self.ctx.world)
            )
        ]
        sync = {"bp": None, "ldrl": self.cfg.feedback_sync}.get(self.cfg.algorithm, "weights")
        return {
            "world_size": self.ctx.world,
            "backend": self.ctx.backend,
            "global_batch_size": self.cfg.batch_size,
            "per_process_batch_size": sizes,
            "feedback_sync": sync if self.ctx.world > 1 else None,
        }

    def _evaluate(self) -> dict:
        """Test metrics in the run's precision (the forward pass it trains with)."""
        with self.precision.autocast():
            return evaluate(self.model, self.test_set, self.cfg, self.info, self.ctx)

    def finish(self) -> dict:
        """Final evaluation and summary.json (rank 0 writes it; every rank returns it, the
        alignment only on rank 0)."""
        final = self._evaluate()
        alignment = layer_metrics(self.algorithm, *self.probe) if self.ctx.main else None
        summary = {
            "test_accuracy": final["test_top1"],
            "test_top5": final["test_top5"],
            "test_loss": final["test_loss"],
            "epochs_completed": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "finished": self.epoch >= self.cfg.epochs,
            "train_time_s": self.elapsed,
            "alignment": alignment,
            "config": self.cfg.to_dict(),
            "seed": self.cfg.seed,
            "processes": self._processes(),
            "precision": self.precision.summary(),
            "versions": versions(),
            "device": self._device_name(),
            "build_info": dtp_ext.build_info(),
        }
        if self.ctx.main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            self._report(summary)
        self.ctx.barrier()  # every rank returns once the files are written
        return summary

    def _device_name(self) -> str:
        if self.device.startswith("cuda"):
            name = f"{self.device} ({torch.cuda.get_device_name(torch.device(self.device))})"
        else:
            name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        return name if self.ctx.world == 1 else f"{name}, rank 0 of {self.ctx.world} processes"

    def _report(self, s: dict):
        self.log(
            f"test accuracy {s['test_accuracy']:.2f}% (top-5 {s['test_top5']:.2f}%) after "
            f"{s['global_step']} steps, {s['train_time_s']:.0f} s of training"
        )
        a = s["alignment"]
        width = max([10, *(len(n) + 1 for n in a["update_angle"])])  # converted models' long names
        self.log(f"{'layer':<{width}}{'weight angle':>14}{'distance':>10}{'update vs BP':>14}")
        for name, update in a["update_angle"].items():
            w = a.get("weight_angle", {}).get(name)
            d = a.get("weight_distance", {}).get(name)
            self.log(
                f"{name:<{width}}{'-' if w is None else f'{w:.1f}°':>14}"
                f"{'-' if d is None else f'{d:.2f}':>10}{update:>13.1f}°"
            )
        written = [n for n in (*OUTPUTS, ckpt.CHECKPOINT_NAME) if (self.out / n).exists()]
        written += [p.name for p in event_files(self.out)]
        self.log(f"wrote in {self.out}: {', '.join(written)}")
