"""The training loop of `dtp-ext train`: data, model, algorithm, optimizer, then epochs of steps,
with a log line every --log-every steps, a checkpoint at every epoch's end (and every
--checkpoint-every steps), and a graceful stop on --max-steps or a signal.

Run composes the run and drives the loop; each of its collaborators has one job:

- progress: the epoch/step counters and the running train metrics (Progress);
- run_state: what a checkpoint holds, its save and restore, the RNG states (RunState);
- run_log: config.json, metrics.jsonl, steps.jsonl, their TensorBoard mirror and the plots, and
  what a fresh or resumed run keeps of them (RunLog);
- step_guard: the refusals of a step whose loss or gradients are not finite (TrainingDiverged);
- summary: summary.json and the report that ends a run;
- schedule: the forward lr schedule;
- interrupt: the signals that stop the run at a step boundary.

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
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from dtp_ext import ops

from . import checkpoint as ckpt
from . import distributed, interrupt, summary
from .algorithms import FeedbackSettings, make_algorithm
from .batches import batch_count, normalise, steps_per_epoch, train_batches
from .catalog import build_model, model_spec
from .config import ConfigError, TrainConfig
from .datasets import INFO, load_split
from .evaluation import batch_totals, evaluate
from .precision import MAX_CONSECUTIVE_OVERFLOWS, Precision
from .probe import layer_metrics
from .progress import Progress
from .resolve import lr_units_note
from .run_log import CONFIG_NAME, OUTPUTS, SUMMARY_NAME, RunLog, default_log_every
from .run_state import RunState
from .schedule import make_scheduler
from .step_guard import (
    TrainingDiverged,
    refuse_bad_gradients,
    refuse_bad_loss,
    refuse_overflows,
)

__all__ = ["CONFIG_NAME", "OUTPUTS", "Run", "TrainingDiverged"]


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
        self.progress = Progress()
        self.resumed_from: int | None = None
        self.stop_requested = False
        self.run_log: RunLog | None = None  # rank 0's records, from restore() or train()
        self._started: float | None = None  # when the epoch in progress (re)started training
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
        self.run_state = RunState(
            cfg,
            ctx,
            self.model,
            self.optimizer,
            self.scheduler,
            self.algorithm,
            self.precision,
            self.progress,
            self.log,
        )

    # The counters, for whoever holds a Run (the loop reads self.progress).
    epoch = property(lambda self: self.progress.epoch)
    step_in_epoch = property(lambda self: self.progress.step_in_epoch)
    global_step = property(lambda self: self.progress.global_step)
    elapsed = property(lambda self: self.progress.elapsed)
    counter = property(lambda self: self.progress.counter)  # the epoch's running train metrics

    # -- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict:
        """This rank's state; `save` adds every rank's RNG states under several processes."""
        return self.run_state.state_dict()

    def save(self):
        """Collective under several processes: checks that the ranks agree, then rank 0 writes
        its state plus every rank's RNG states ("rank_rng")."""
        self.run_state.save(self.out)

    def restore(self, state: dict, source="the checkpoint"):
        """Continue from `state` (every rank loads the same rank-0 checkpoint). Raises
        CheckpointError, naming `source`, if it does not fit this run's configuration."""
        self.run_state.restore(state, source, self.steps_per_epoch)
        self.resumed_from = self.progress.global_step
        if self.ctx.main:
            # Records past the checkpoint (a crash between the log and the save) are dropped.
            self.run_log = RunLog.resumed(
                self.out, self.log, self.progress.epoch, self.progress.global_step
            )

    # -- the run --------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, ctx, progress = self.cfg, self.ctx, self.progress
        self._started = None
        if ctx.main:
            self.out.mkdir(parents=True, exist_ok=True)
            stale = ckpt.remove_stale_temporaries(self.out)
            if stale:
                self.log(f"removed {', '.join(stale)}: a checkpoint save interrupted by a kill")
            if self.run_log is None:  # a fresh run: no stale outputs of an earlier one
                self.run_log = RunLog.fresh(self.out, self.log)
        batch = f"batch {cfg.batch_size}"
        if ctx.world > 1:
            p = summary.processes(cfg, ctx)
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
            position = progress.position(cfg.epochs, self.steps_per_epoch)
            self.log(f"resumed from step {progress.global_step} ({position})")
        left = progress.nothing_left(cfg, self.steps_per_epoch)
        if left:
            return self._nothing_to_do(left)
        if ctx.main:
            self.run_log.start(cfg.to_dict(), cfg.tensorboard)
        try:
            return self._train()
        finally:
            if self.run_log is not None:
                self.run_log.close()

    def _train(self) -> dict:
        cfg, ctx, progress = self.cfg, self.ctx, self.progress
        signum = interrupt.agreed(ctx)  # received while the data was read
        if signum:
            self._stop("signal", signum)
        stopped = False
        while progress.epoch < cfg.epochs and not stopped:
            self.algorithm.epoch = progress.epoch  # DRL's "s" variant alternates epochs
            lr = self.optimizer.param_groups[0]["lr"]
            started = self._started = time.perf_counter()
            signum = None
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=progress.step_in_epoch,
                disable=not (cfg.progress and ctx.main),
                desc=f"epoch {progress.epoch + 1}/{cfg.epochs}",
                unit="step",
                dynamic_ncols=True,
            )
            for step, x, y in train_batches(
                self.train_set,
                cfg.batch_size,
                cfg.seed,
                progress.epoch,
                progress.step_in_epoch,
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
                progress.step_in_epoch = step + 1
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss:.3f}",
                    acc=f"{progress.counter.means('train')['train_top1']:.1f}%",
                    refresh=False,
                )
                last = progress.step_in_epoch == self.steps_per_epoch
                # The run's first step has a line at once, for whoever watches the file; the
                # epoch's end logs its own.
                if (
                    progress.global_step % cfg.log_every == 0 or progress.global_step == 1
                ) and not last:
                    self._log_step()
                if self.stop_requested:  # a signal on some rank: all ranks agree on this step
                    signum = interrupt.requested() or interrupt.signal.SIGTERM
                    break
                if cfg.max_steps is not None and progress.global_step >= cfg.max_steps and not last:
                    stopped = True
                    break
                if (
                    cfg.checkpoint_every
                    and progress.global_step % cfg.checkpoint_every == 0
                    and not last
                ):
                    self.save()
            bar.close()
            progress.elapsed += time.perf_counter() - started
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
                stopped = cfg.max_steps is not None and progress.global_step >= cfg.max_steps
                signum = interrupt.agreed(ctx)  # received during the evaluation
                if signum:
                    self._stop("signal", signum)
        signum = interrupt.agreed(ctx)
        if signum:  # the checkpoint is complete; the final evaluation is left to --resume
            self._stop("signal", signum)
        result = self.finish()
        if interrupt.requested():
            self.log(
                f"{interrupt.name(interrupt.requested())} received during the final evaluation: the run "
                "had finished, its outputs are complete"
            )
        return result

    def _train_step(self, x, y, global_count: int | None = None):
        """One optimizer step on this rank's shard (x, y) of a global batch of `global_count`
        images. Refused, with the forward weights and optimizer state untouched, if the loss or
        any forward gradient is not finite on any rank (all ranks agree, none hangs)."""
        self.optimizer.zero_grad(set_to_none=True)
        cause = ""
        try:
            loss, logits = self.algorithm.train_step(x, y, self.progress.global_step)
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
        where = self.progress.at_step()
        refuse_bad_loss(totals, value, cause, where, lr)
        refuse_bad_gradients(totals, self.named_params, self.precision, value, where, lr)
        if not self.precision.step(self.optimizer, overflow=totals.bad_grad):
            # fp16: GradScaler skipped the step and halved the scale; the batch still counts
            refuse_overflows(self.precision, MAX_CONSECUTIVE_OVERFLOWS, where, lr)
        self.progress.count_step(totals)
        return value

    def _end_epoch(self, lr: float, epoch_time: float):
        progress = self.progress
        record = {
            "epoch": progress.epoch + 1,
            "step": progress.global_step,
            **progress.counter.means("train"),
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
                    "time_s": progress.elapsed,
                }
            )
            self.run_log.add_epoch(record)
        if progress.window_steps:
            self._log_step("epoch", alignment)
        with warnings.catch_warnings():
            # A run resumed right at an epoch's end (stopped by a signal after its last step)
            # steps the restored scheduler before any optimizer step of this process: harmless.
            warnings.filterwarnings(
                "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
            )
            self.scheduler.step()
        progress.next_epoch()
        self.save()
        self._plot()
        return record

    def _log_step(self, kind: str | None = None, alignment: dict | None = None):
        """A steps.jsonl line (rank 0), and its scalars in the TensorBoard event file: train
        metrics over the steps since the previous regular line, the lr, the last feedback
        losses and the alignment on the probe batch. `kind` "epoch" marks an epoch's end;
        "stop" a run stopping (--max-steps, a signal), which leaves the window running so that
        the regular lines match an uninterrupted run."""
        progress = self.progress
        if self.ctx.main:
            record = {
                "step": progress.global_step,
                "epoch": progress.epoch + 1,
                "epoch_step": progress.step_in_epoch,
                "steps": progress.window_steps,
                **progress.window.means("train"),
                "lr": self.optimizer.param_groups[0]["lr"],
                "feedback_loss": dict(self.algorithm.last_feedback_losses),
                "feedback_quality": self.algorithm.feedback_quality(),
                **(alignment if alignment is not None else self._alignment()),
                "time_s": progress.elapsed
                + (time.perf_counter() - self._started if self._started is not None else 0.0),
            }
            if kind:
                record["kind"] = kind
            self.run_log.add_step(record)
        if kind != "stop":
            progress.reset_window()

    def _alignment(self) -> dict:
        """layer_metrics on the probe batch; {} when the weights have gone non-finite (the step
        guard then stops the run with the reason; a log line must not crash it first)."""
        try:
            return layer_metrics(self.algorithm, *self.probe)
        except (ops.NonFiniteInputError, FloatingPointError):
            return {}

    def _plot(self):
        if self.ctx.main:
            self.run_log.plot(f"{self.cfg.dataset} {self.cfg.model} {self.cfg.algorithm}")

    def _stop(self, why: str, signum: int | None = None):
        """Mid-epoch stop (--max-steps or a signal): checkpoint, a steps.jsonl line, plots."""
        self.save()  # --resume continues at the next step
        if self.progress.window_steps:
            self._log_step("stop")
        self._plot()
        where = self.progress.where(self.steps_per_epoch)
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

    def _nothing_to_do(self, why: str) -> dict:
        """A resumed run with no step left: summary.json is rewritten only if it is not this
        step's already (a run stopped by a signal before its final evaluation)."""
        self.log(f"nothing left to do: {why}")
        step = self.progress.global_step
        current = summary.read_current(self.out, step) if self.ctx.main else None
        if self.ctx.any(current is not None):
            self.log(
                f"{self.out / SUMMARY_NAME} is up to date (step {step}); nothing was rewritten"
            )
            return current if current is not None else {"global_step": step}
        return self.finish()

    def _evaluate(self) -> dict:
        """Test metrics in the run's precision (the forward pass it trains with)."""
        with self.precision.autocast():
            return evaluate(self.model, self.test_set, self.cfg, self.info, self.ctx)

    def finish(self) -> dict:
        """Final evaluation and summary.json (rank 0 writes it; every rank returns it, the
        alignment only on rank 0)."""
        final = self._evaluate()
        alignment = layer_metrics(self.algorithm, *self.probe) if self.ctx.main else None
        result = summary.build(self.cfg, self.ctx, self.progress, final, alignment, self.precision)
        if self.ctx.main:
            summary.write(self.out, result)
            summary.report(result, self.out, self.log)
        self.ctx.barrier()  # every rank returns once the files are written
        return result
