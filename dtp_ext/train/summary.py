"""summary.json of `dtp-ext train`: the final test metrics, the alignment on the probe batch,
where the run stopped, how it was split across processes, and what it ran on (versions, device,
the extension's build); and the lines that report it."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import dtp_ext

from . import checkpoint as ckpt
from . import distributed
from .batches import shard
from .config import TrainConfig
from .events import event_files
from .precision import Precision
from .progress import Progress
from .run_log import OUTPUTS, SUMMARY_NAME


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


def device_name(device: str, world: int) -> str:
    if device.startswith("cuda"):
        name = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    else:
        name = (
            f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )
    return name if world == 1 else f"{name}, rank 0 of {world} processes"


def processes(cfg: TrainConfig, ctx: distributed.Context) -> dict:
    """How the run is split across processes (summary.json "processes")."""
    sizes = [hi - lo for lo, hi in (shard(cfg.batch_size, r, ctx.world) for r in range(ctx.world))]
    sync = {"bp": None, "ldrl": cfg.feedback_sync}.get(cfg.algorithm, "weights")
    return {
        "world_size": ctx.world,
        "backend": ctx.backend,
        "global_batch_size": cfg.batch_size,
        "per_process_batch_size": sizes,
        "feedback_sync": sync if ctx.world > 1 else None,
    }


def build(
    cfg: TrainConfig,
    ctx: distributed.Context,
    progress: Progress,
    final: dict,
    alignment: dict | None,
    precision: Precision,
) -> dict:
    """The summary of a run at `progress`: `final` its test metrics (evaluation.evaluate),
    `alignment` the probe batch's layer metrics (rank 0; None elsewhere)."""
    return {
        "test_accuracy": final["test_top1"],
        "test_top5": final["test_top5"],
        "test_loss": final["test_loss"],
        "epochs_completed": progress.epoch,
        "step_in_epoch": progress.step_in_epoch,
        "global_step": progress.global_step,
        "finished": progress.epoch >= cfg.epochs,
        "train_time_s": progress.elapsed,
        "alignment": alignment,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "processes": processes(cfg, ctx),
        "precision": precision.summary(),
        "versions": versions(),
        "device": device_name(ctx.device, ctx.world),
        "build_info": dtp_ext.build_info(),
    }


def write(out: Path, summary: dict):
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str))


def read_current(out: Path, global_step: int) -> dict | None:
    """OUT/summary.json if it is the summary of step `global_step`, else None (none there, not
    JSON, or another step's)."""
    path = out / SUMMARY_NAME
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except ValueError:
        return None
    if not isinstance(summary, dict) or summary.get("global_step") != global_step:
        return None
    return summary


def report(summary: dict, out: Path, log: Callable):
    """The run's last lines: test accuracy, the alignment per layer, the files written."""
    s = summary
    log(
        f"test accuracy {s['test_accuracy']:.2f}% (top-5 {s['test_top5']:.2f}%) after "
        f"{s['global_step']} steps, {s['train_time_s']:.0f} s of training"
    )
    a = s["alignment"]
    width = max([10, *(len(n) + 1 for n in a["update_angle"])])  # converted models' long names
    log(f"{'layer':<{width}}{'weight angle':>14}{'distance':>10}{'update vs BP':>14}")
    for name, update in a["update_angle"].items():
        w = a.get("weight_angle", {}).get(name)
        d = a.get("weight_distance", {}).get(name)
        log(
            f"{name:<{width}}{'-' if w is None else f'{w:.1f}°':>14}"
            f"{'-' if d is None else f'{d:.2f}':>10}{update:>13.1f}°"
        )
    written = [n for n in (*OUTPUTS, ckpt.CHECKPOINT_NAME) if (out / n).exists()]
    written += [p.name for p in event_files(out)]
    log(f"wrote in {out}: {', '.join(written)}")
