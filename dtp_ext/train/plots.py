"""PNG plots of a run from its metrics.jsonl records (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _layer_series(records, key):
    names = list(records[-1].get(key, {}) or {})
    return {n: [r.get(key, {}).get(n) for r in records] for n in names}


def write_plots(records: List[dict], out_dir: Path, title: str):
    if not records:
        return
    epochs = [r["epoch"] for r in records]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [r["train_top1"] for r in records], "o-", label="train")
    ax.plot(epochs, [r["test_top1"] for r in records], "s-", label="test")
    ax.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=120)
    plt.close(fig)

    panels = [("weight_angle", "forward-feedback weight angle (deg)"),
              ("update_angle", "update vs backprop angle (deg)")]
    panels = [p for p in panels if _layer_series(records, p[0])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for name, values in _layer_series(records, key).items():
            ax.plot(epochs, values, "o-", label=name)
        ax.set(xlabel="epoch", ylabel=label)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_dir / "alignment.png", dpi=120)
    plt.close(fig)
