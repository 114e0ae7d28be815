"""What a checkpoint of `dtp-ext train` holds, and how a run saves and restores it: the forward
weights, the optimizer and lr scheduler, the algorithm's state (feedback weights and their
trainer), the loss scale, the counters (progress.py), the last feedback losses and quality (for
the logs), and the global RNG states of every rank. checkpoint.py writes and checks the file.

The global RNG drives model init and the feedback noise only (batch order and augmentation have
their own generators, batches.py), so restoring it lets a resumed run replay exactly the steps
an uninterrupted one takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed
from .algorithms.base import Algorithm
from .config import TrainConfig
from .precision import Precision
from .progress import Progress


@dataclass
class RunState:
    """The parts of a run a checkpoint holds, as one rank sees them. `saved_step` is the step
    of the latest checkpoint on disk (None before the first)."""

    cfg: TrainConfig
    ctx: distributed.Context
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    algorithm: Algorithm
    precision: Precision
    progress: Progress
    log: Callable  # rank 0's notes; a no-op on the other ranks
    saved_step: int | None = None

    def state_dict(self) -> dict:
        """This rank's state; `save` adds every rank's RNG states under several processes."""
        progress = self.progress
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "algorithm": self.algorithm.state_dict(),
            "rng": ckpt.rng_states(),
            "precision": self.precision.state_dict(),
            "epoch": progress.epoch,
            "step_in_epoch": progress.step_in_epoch,
            "global_step": progress.global_step,
            "counter": progress.counter.state,
            "window": {"counter": progress.window.state, "steps": progress.window_steps},
            "feedback_losses": dict(self.algorithm.last_feedback_losses),  # for the logs
            "feedback_quality": self.algorithm.feedback_quality(),  # for the logs
            "elapsed": progress.elapsed,
            "world_size": self.ctx.world,
            "threads": torch.get_num_threads(),
        }

    def save(self, out: Path):
        """Collective under several processes: checks that the ranks agree, then rank 0 writes
        its state plus every rank's RNG states ("rank_rng") to OUT/checkpoint.pt."""
        state = self.state_dict()
        rngs = self.ctx.gather(state["rng"])
        self.ctx.check_identical(
            [state[k] for k in ("model", "optimizer", "algorithm", "counter")],
            "weights, optimizer or feedback state",
        )
        if self.ctx.main:
            if self.ctx.world > 1:
                state["rank_rng"] = rngs
            kept = (
                f"the previous checkpoint (step {self.saved_step}) is kept"
                if self.saved_step is not None
                else "there is no earlier checkpoint"
            )
            ckpt.save_atomic(state, out / ckpt.CHECKPOINT_NAME, kept=kept)
            self.saved_step = self.progress.global_step

    def restore(self, state: dict, source, steps_per_epoch: int):
        """Continue from `state` (every rank loads the same rank-0 checkpoint). Raises
        CheckpointError, naming `source`, if it does not fit this run's configuration."""
        cfg = self.cfg
        ckpt.check_compatible(state, cfg, source)
        ckpt.check_counters(
            state,
            source,
            steps_per_epoch,
            same_world=state.get("world_size", 1) == self.ctx.world,
        )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.algorithm.load_state_dict(state["algorithm"])
            # absent from checkpoints written before --precision (fp32 runs)
            self.precision.load_state_dict(state.get("precision") or {})
            self.progress.load_state_dict(state)
            self.algorithm.last_feedback_losses = dict(state.get("feedback_losses") or {})
            self.algorithm.last_feedback_quality = dict(state.get("feedback_quality") or {})
            self._restore_rng(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise ckpt.CheckpointError(
                f"{source}: its saved state does not fit a {cfg.algorithm} run of "
                f"{cfg.model} ({type(exc).__name__}: {str(exc).strip()[:400]})"
            ) from None
        self.saved_step = self.progress.global_step
        self._note_threads(state, source)

    def _restore_rng(self, state: dict):
        """This rank's RNG states; a rank the checkpoint has none for gets a fresh, reproducible
        stream."""
        ctx = self.ctx
        per_rank = state.get("rank_rng") or [state["rng"]]
        if ctx.rank < len(per_rank):
            ckpt.set_rng_states(per_rank[ctx.rank])
        else:  # more processes than the run that wrote the checkpoint
            distributed.seed_all(
                distributed.rank_seed(self.cfg.seed, ctx.rank, self.progress.global_step)
            )
        if len(per_rank) != ctx.world:
            self.log(
                f"note: the checkpoint was written by {len(per_rank)} process(es), this run has "
                f"{ctx.world}: the data is the same global batches, but the feedback noise "
                "(and the float summation order) differ from an uninterrupted run"
            )

    def _note_threads(self, state: dict, source):
        """On the CPU, says so when the checkpoint was written with another thread count: float
        sums are then split differently."""
        saved_threads = state.get("threads", ckpt.saved_config(state, source).threads)
        if not self.ctx.device.startswith("cuda") and saved_threads not in (
            None,
            torch.get_num_threads(),
        ):
            self.log(
                f"note: the checkpoint was written with {saved_threads} CPU thread(s), this run uses "
                f"{torch.get_num_threads()}: it continues, but is not bitwise identical to an "
                "uninterrupted run (float sums are split differently); resume with "
                f"--threads {saved_threads} for that"
            )
