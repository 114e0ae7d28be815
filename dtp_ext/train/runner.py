"""The training loop of `dtp-ext train`: data, model, algorithm, optimizer, logs, checkpoints.

Determinism: the global RNG is seeded once, then used only by model init and the feedback
noise; batch order and augmentation come from their own (seed, epoch, step) generators
(batches.py). A checkpoint holds the global RNG state, so stopping after any step and resuming
replays exactly the computation an uninterrupted run does.
"""
from __future__ import annotations

import json
import math
import platform
import random
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import dtp_ext

from . import checkpoint as ckpt
from .algorithms import FeedbackSettings, make_algorithm
from .batches import eval_batches, normalise, steps_per_epoch, train_batches
from .config import TrainConfig
from .datasets import INFO, load_split
from .models import build_model
from .plots import write_plots
from .probe import layer_metrics
from .resolve import lr_units_note


class TrainingDiverged(RuntimeError):
    pass


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


class Counter:
    """Running train loss and top-1/top-5 over an epoch (plain floats: saved in checkpoints)."""

    def __init__(self, state: Optional[dict] = None):
        self.state = dict(state or {"loss": 0.0, "top1": 0, "top5": 0, "seen": 0})

    def add(self, loss: float, logits: torch.Tensor, labels: torch.Tensor):
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        n = labels.shape[0]
        self.state["loss"] += loss * n
        self.state["top1"] += int(hit[:, 0].sum())
        self.state["top5"] += int(hit.any(1).sum())
        self.state["seen"] += n

    def means(self, prefix: str) -> Dict[str, float]:
        n = max(self.state["seen"], 1)
        return {f"{prefix}_loss": self.state["loss"] / n, f"{prefix}_top1": 100 * self.state["top1"] / n,
                f"{prefix}_top5": 100 * self.state["top5"] / n}


@torch.no_grad()
def evaluate(model, data, cfg: TrainConfig, info) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    counter = Counter()
    for x, y in eval_batches(data, cfg.eval_batch_size, info.mean, info.std, cfg.device):
        logits = model(x)
        counter.add(float(F.cross_entropy(logits, y)), logits, y)
    model.train(was_training)
    return counter.means("test")


def versions() -> Dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__,
             "numpy": np.__version__, "dtp_ext": dtp_ext.__version__}
    try:
        import torchvision
        found["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return found


class Run:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.info = INFO[cfg.dataset]
        self.train_set = load_split(cfg.dataset, cfg.data_dir, "train").subset(cfg.train_subset)
        self.test_set = load_split(cfg.dataset, cfg.data_dir, "test").subset(cfg.test_subset)
        info = self.info
        self.model = build_model(cfg.model, info.channels, info.size, info.classes, cfg.beta).to(cfg.device)
        feedback = FeedbackSettings(cfg.feedback_iterations, cfg.feedback_noise, cfg.feedback_lr,
                                    cfg.feedback_momentum, cfg.feedback_warmup_steps,
                                    cfg.feedback_warmup_factor)
        self.algorithm = make_algorithm(cfg.algorithm, self.model, feedback,
                                        (info.channels, info.size, info.size), info.classes)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        probe = self.train_set.subset(cfg.probe_batch_size)
        self.probe = (normalise(probe.images.to(cfg.device), info.mean, info.std), probe.labels.to(cfg.device))
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.counter = Counter()
        self.elapsed = 0.0
        self.steps_per_epoch = steps_per_epoch(len(self.train_set), cfg.batch_size)

    # -- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict:
        return {"config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "algorithm": self.algorithm.state_dict(), "rng": ckpt.rng_states(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "counter": self.counter.state,
                "elapsed": self.elapsed}

    def save(self):
        ckpt.save_atomic(self.state(), self.out / ckpt.CHECKPOINT_NAME)

    def restore(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.algorithm.load_state_dict(state["algorithm"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.elapsed = state["global_step"], state["elapsed"]
        self.counter = Counter(state["counter"])
        ckpt.set_rng_states(state["rng"])
        # Epoch records past the checkpoint (a crash between the log and the save) are dropped.
        self.records = [r for r in self._read_records() if r["epoch"] <= self.epoch]
        self._write_records()

    def _read_records(self):
        path = self.out / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def _write_records(self):
        with open(self.out / "metrics.jsonl", "w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")

    # -- training -------------------------------------------------------------------------
    def _train_step(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss, logits = self.algorithm.train_step(x, y, self.global_step)
            value = float(loss)
        except FloatingPointError as exc:  # FeedbackTrainer refuses non-finite feedback steps
            value, cause = float("nan"), f" ({exc})"
        else:
            cause = ""
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"the training loss became {value}{cause} at step {self.global_step} (epoch {self.epoch + 1}); "
                f"lower the forward lr (now {self.optimizer.param_groups[0]['lr']:g}) or train the feedback "
                "weights longer first (feedback_warmup_steps / feedback_warmup_factor)")
        self.optimizer.step()
        self.counter.add(value, logits, y)
        self.global_step += 1
        return value

    def _end_epoch(self, lr: float, epoch_time: float):
        record = {"epoch": self.epoch + 1, "step": self.global_step, **self.counter.means("train"),
                  **evaluate(self.model, self.test_set, self.cfg, self.info),
                  "lr": lr, "feedback_lr": self.cfg.feedback_lr,
                  **layer_metrics(self.algorithm, *self.probe),
                  "feedback_loss": dict(self.algorithm.last_feedback_losses),
                  "epoch_time_s": epoch_time, "time_s": self.elapsed}
        self.records.append(record)
        self._write_records()
        self.scheduler.step()
        self.epoch, self.step_in_epoch, self.counter = self.epoch + 1, 0, Counter()
        self.save()
        write_plots(self.records, self.out, f"{self.cfg.dataset} {self.cfg.model} {self.cfg.algorithm}")
        return record

    def train(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if not hasattr(self, "records"):
            self.records = []
            self._write_records()
        self.log(f"dtp-ext train: {cfg.algorithm} on {cfg.dataset} ({len(self.train_set)} train / "
                 f"{len(self.test_set)} test images), model {cfg.model}, {cfg.epochs} epoch(s) of "
                 f"{self.steps_per_epoch} steps, batch {cfg.batch_size}, {lr_units_note(cfg)}, "
                 f"device {cfg.device}, out {self.out}")
        stopped = cfg.max_steps is not None and self.global_step >= cfg.max_steps
        while self.epoch < cfg.epochs and not stopped:
            lr = self.optimizer.param_groups[0]["lr"]
            started = time.perf_counter()
            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not cfg.progress,
                       desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="step", dynamic_ncols=True)
            for step, x, y in train_batches(self.train_set, cfg.batch_size, cfg.seed, self.epoch,
                                            self.step_in_epoch, self.info.mean, self.info.std,
                                            cfg.augment, cfg.device):
                loss = self._train_step(x, y)
                self.step_in_epoch = step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{self.counter.means('train')['train_top1']:.1f}%",
                                refresh=False)
                last = self.step_in_epoch == self.steps_per_epoch
                if cfg.max_steps is not None and self.global_step >= cfg.max_steps and not last:
                    stopped = True
                    break
            bar.close()
            self.elapsed += time.perf_counter() - started
            if stopped:
                self.save()  # mid-epoch: --resume continues at the next step
                self.log(f"stopped after step {self.global_step} (--max-steps); checkpoint in {self.out}")
            else:
                record = self._end_epoch(lr, time.perf_counter() - started)
                self.log(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} "
                         f"top-1 {record['train_top1']:.2f}%, test loss {record['test_loss']:.4f} "
                         f"top-1 {record['test_top1']:.2f}%")
                stopped = cfg.max_steps is not None and self.global_step >= cfg.max_steps
        return self.finish()

    def finish(self) -> dict:
        final = evaluate(self.model, self.test_set, self.cfg, self.info)
        alignment = layer_metrics(self.algorithm, *self.probe)
        summary = {"test_accuracy": final["test_top1"], "test_top5": final["test_top5"],
                   "test_loss": final["test_loss"], "epochs_completed": self.epoch,
                   "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                   "finished": self.epoch >= self.cfg.epochs, "train_time_s": self.elapsed,
                   "alignment": alignment, "config": self.cfg.to_dict(), "seed": self.cfg.seed,
                   "versions": versions(), "device": self._device_name(),
                   "build_info": dtp_ext.build_info()}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        self._report(summary)
        return summary

    def _device_name(self) -> str:
        if self.cfg.device.startswith("cuda"):
            return f"{self.cfg.device} ({torch.cuda.get_device_name(torch.device(self.cfg.device))})"
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    def _report(self, s: dict):
        self.log(f"test accuracy {s['test_accuracy']:.2f}% (top-5 {s['test_top5']:.2f}%) after "
                 f"{s['global_step']} steps, {s['train_time_s']:.0f} s of training")
        a = s["alignment"]
        self.log(f"{'layer':<10}{'weight angle':>14}{'distance':>10}{'update vs BP':>14}")
        for name, update in a["update_angle"].items():
            w = a.get("weight_angle", {}).get(name)
            d = a.get("weight_distance", {}).get(name)
            self.log(f"{name:<10}{'-' if w is None else f'{w:.1f}°':>14}"
                     f"{'-' if d is None else f'{d:.2f}':>10}{update:>13.1f}°")
        self.log(f"wrote {self.out}/metrics.jsonl, summary.json, *.png, {ckpt.CHECKPOINT_NAME}")
