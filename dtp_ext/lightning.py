"""PyTorch Lightning integration: `FeedbackCallback` runs the L-DRL feedback phase inside a
LightningModule's training loop.

    import lightning as L
    from dtp_ext.lightning import FeedbackCallback

    L.Trainer(callbacks=[FeedbackCallback()]).fit(lit_module, loader)

Needs the `lightning` package (`pip install lightning`, or `pip install "dtp_ext[lightning]"`);
`import dtp_ext` never imports it.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        SingleDeviceStrategy,
        SingleDeviceXLAStrategy,
        XLAStrategy,
    )
except ModuleNotFoundError as exc:
    if exc.name is None or exc.name.split(".")[0] != "lightning":
        raise
    raise ImportError(
        "dtp_ext.lightning needs PyTorch Lightning, which is not installed: "
        'pip install lightning (or pip install "dtp_ext[lightning]")'
    ) from exc

from .feedback.ranks import process_group_size, process_rank
from .loss_scaling import loss_scale
from .nn import end_forward_pass, start_forward_pass
from .trainer import FeedbackReport, FeedbackTrainer

__all__ = ["FeedbackCallback"]

_TRAINER_ARGUMENTS = tuple(p for p in inspect.signature(FeedbackTrainer).parameters if p != "model")


class FeedbackCallback(Callback):
    """Runs `FeedbackTrainer.step()` for a LightningModule's DTP blocks in `lightning.Trainer.fit`.

    `FeedbackCallback(**kwargs)` takes FeedbackTrainer's arguments (none needed: settings are
    planned per block) and builds `self.feedback_trainer = FeedbackTrainer(lightning_module,
    **kwargs)` at each fit's setup, as Lightning builds the optimisers; block names (`blocks=`,
    `explain()`) are relative to the LightningModule (`"net.0"`). `self.last_report` is the
    latest step's FeedbackReport.

    Ordering: the feedback phase needs the inputs the blocks recorded in the latest training
    forward pass, and the backward that follows turns the gradients into targets through the
    feedback weights, so it runs in `on_before_backward`: after `training_step` (the forward)
    and before its backward, as `trainer.step()` sits between `model(x)` and
    `loss.backward()` in a plain loop; the optimiser step and gradient clipping come after.
    Manual optimisation: once before each `manual_backward`.

    `accumulate_grad_batches=n`: once per optimiser step, before the first micro-batch's
    backward, so every micro-batch's targets use the same feedback weights and the
    accumulated gradients are those of one batch n times the size (the plain loop's
    accumulation in the README), at the cost of one feedback phase per optimiser step.
    Lightning divides the loss by n, so each backward runs inside `dtp_ext.loss_scale(1 / n)`:
    identical to the plain loop's micro-batches (README, "Scaled losses").

    Precision: `"bf16-mixed"` records bfloat16 inputs under autocast, and the feedback phase
    runs in bfloat16 with float32 master feedback weights (FeedbackTrainer's `compute_dtype`).
    `"16-mixed"` scales the loss with the precision plugin's GradScaler: the backward runs
    inside `dtp_ext.loss_scale(scaler.get_scale())` (times 1 / n when accumulating), so
    the blocks divide the scale out of their target steps. Lightning turns `"16-mixed"` on
    the CPU into `"bf16-mixed"`; `plugins=[MixedPrecision("16-mixed", "cpu")]` keeps float16.

    Devices: single-device and DDP strategies (`"ddp"`, `"ddp_spawn"`, ...); under DDP the
    feedback weights stay identical across processes through FeedbackTrainer's `sync`
    (default `"gradients"`, or `FeedbackCallback(sync="weights")`). Other strategies
    (DeepSpeed, FSDP, XLA) are refused at setup.

    Checkpoints: the trainer's state (momentum, step counts, plans' batch, averages) and,
    with `restore_rng=True`, every process's torch generators (the CPU's and its CUDA
    device's: the feedback noise is drawn from them, and Lightning's checkpoints do not hold
    them) are saved with the callback's state and restored when the resumed fit starts
    (`on_fit_start`), so that resuming from a checkpoint taken at an epoch's end continues as
    the uninterrupted run would. Restoring the generators also restores them for everything else that draws from
    them (dropout, shuffling); `restore_rng=False` leaves them alone.
    """

    def __init__(self, *, restore_rng: bool = True, **feedback_trainer_kwargs):
        unknown = sorted(set(feedback_trainer_kwargs) - set(_TRAINER_ARGUMENTS))
        if unknown:
            raise TypeError(
                f"FeedbackCallback: {', '.join(unknown)} "
                f"{'is not a FeedbackTrainer argument' if len(unknown) == 1 else 'are not FeedbackTrainer arguments'} "
                f"(those are {', '.join(_TRAINER_ARGUMENTS)}; the model is the LightningModule)"
            )
        if not isinstance(restore_rng, bool):
            raise ValueError(
                f"FeedbackCallback: restore_rng must be True or False, got {restore_rng!r}"
            )
        self.restore_rng = restore_rng
        self.feedback_trainer_kwargs = dict(feedback_trainer_kwargs)
        self.feedback_trainer: FeedbackTrainer | None = None
        self.last_report: FeedbackReport | None = None
        self._pending_state: dict | None = None
        self._scale: contextlib.ExitStack | None = None
        self._feedback_due = True  # automatic optimisation: one feedback phase per window
        self._pass_open = False
        self._device: torch.device | None = None

    # -- setup -------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        others = [c for c in trainer.callbacks if isinstance(c, FeedbackCallback) and c is not self]
        if others:
            raise ValueError(
                "FeedbackCallback: the Trainer's callbacks hold more than one FeedbackCallback; "
                "each would run its own feedback phase on the same blocks (pass one)"
            )
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(
            strategy, (DeepSpeedStrategy, XLAStrategy, SingleDeviceXLAStrategy)
        ):
            raise ValueError(
                f"FeedbackCallback: strategy {type(strategy).__name__} is not supported; use a "
                "single device or DDP (strategy='ddp', 'ddp_spawn', ...)"
            )
        self.feedback_trainer = FeedbackTrainer(pl_module, **self.feedback_trainer_kwargs)
        self._device = strategy.root_device  # this process's device (DDP: one per process)
        self.last_report = None
        self._pending_state = None
        self._feedback_due = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A checkpoint's state is applied here: after Lightning has restored the model and
        # moved it to its device, before the first training batch's data iterator draws from
        # the generators (the sanity check runs with isolated generators).
        self._apply_pending_state()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_pending_state()  # a strategy that restores checkpoints after on_fit_start

    def _apply_pending_state(self):
        if self._pending_state is None:
            return
        state, self._pending_state = self._pending_state, None
        self.feedback_trainer.load_state_dict(state["feedback_trainer"])
        if self.restore_rng:
            _set_rng_state(state.get("rng"), self._device)

    # -- the forward pass, the feedback phase and the loss scale ------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # training_step is one forward pass for the blocks, however it reaches them (self(x),
        # self.net(x), several calls): a block it calls several times trains on all its inputs.
        self._close_pass(pl_module)
        start_forward_pass(pl_module)
        self._pass_open = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._close_pass(pl_module)

    def _close_pass(self, pl_module) -> None:
        if self._pass_open:
            self._pass_open = False
            end_forward_pass(pl_module)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self.feedback_trainer is None:
            raise RuntimeError(
                "FeedbackCallback: a backward pass ran before the callback's setup for fit; "
                "pass the callback to lightning.Trainer(callbacks=[...]) and call trainer.fit"
            )
        self._close_pass(pl_module)
        self._leave_scale()  # a previous backward that raised before on_after_backward
        if self._feedback_due or not pl_module.automatic_optimization:
            self.last_report = self.feedback_trainer.step()
            self._feedback_due = False
        scale = contextlib.ExitStack()
        scale.enter_context(loss_scale(self._loss_scale(trainer, pl_module)))
        self._scale = scale

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._leave_scale()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer
    ) -> None:
        self._feedback_due = True  # the next micro-batch starts a new accumulation window

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close_pass(pl_module)
        self._leave_scale()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._leave_scale()

    @staticmethod
    def _loss_scale(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """The factor Lightning multiplied the training_step loss by before this backward."""
        k = 1.0
        if pl_module.automatic_optimization:  # the loss is divided by the accumulation
            k /= trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # "16-mixed": the loss is multiplied by the GradScaler's scale
            k *= scaler.get_scale()
        return k

    def _leave_scale(self):
        scale, self._scale = self._scale, None
        if scale is not None:
            scale.close()

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.feedback_trainer is None:
            return {}
        # Every process's generators: a collective under DDP, where Lightning calls this on
        # every rank when it saves a checkpoint.
        rng = _rng_state(self._device)
        if process_group_size() > 1:
            gathered = [None] * process_group_size()
            torch.distributed.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        return {"feedback_trainer": self.feedback_trainer.state_dict(), "rng": rng}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "feedback_trainer" not in state_dict:
            raise ValueError(
                "FeedbackCallback.load_state_dict: state_dict must come from "
                "FeedbackCallback.state_dict() (a dict with 'feedback_trainer')"
            )
        self._pending_state = state_dict

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        if not checkpoint.get("callbacks", {}).get(self.state_key):
            warnings.warn(
                "FeedbackCallback: the checkpoint holds no FeedbackCallback state (saved "
                "without the callback, or weights only): the feedback trainer starts afresh "
                "(zero momentum, warm start at each block's first step)",
                RuntimeWarning,
                stacklevel=2,
            )


def _rng_state(device: torch.device | None) -> dict:
    """The generators feedback noise comes from: torch's CPU one and, when the model is on a
    CUDA device, that device's."""
    state = {"cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(states, device: torch.device | None):
    if states is None:
        raise ValueError(
            "FeedbackCallback: the checkpoint's callback state holds no generator states "
            "('rng'); resume with FeedbackCallback(restore_rng=False)"
        )
    if len(states) != process_group_size():
        warnings.warn(
            f"FeedbackCallback: the checkpoint holds the generator states of {len(states)} "
            f"processes, this run has {process_group_size()}: the generators are not restored, so the "
            "resumed run draws other noise than an uninterrupted one",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    state = states[process_rank()]
    on_cuda = device is not None and device.type == "cuda"
    if ("cuda" in state) != on_cuda:
        warnings.warn(
            "FeedbackCallback: the checkpoint was saved with the model "
            f"{'on a CUDA device' if 'cuda' in state else 'on the CPU'}, this run has it on "
            f"{device}: only the CPU generator is restored",
            RuntimeWarning,
            stacklevel=2,
        )
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and on_cuda:
        torch.cuda.set_rng_state(state["cuda"], device)
