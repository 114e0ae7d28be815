"""PNG plots of a run against optimizer steps (matplotlib, Agg backend).

accuracy.png: train loss and top-1 from steps.jsonl (each point the mean over the steps since the
previous line), test loss and top-1 from metrics.jsonl at the step each epoch ended.
alignment.png: per-layer forward-feedback weight angle and update-vs-backprop angle, as measured
at each steps.jsonl line (or each epoch's end for runs logged before steps.jsonl existed).
Epoch ends are dotted vertical lines. Returns the names of the files written.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _layer_names(records, key):
    names = []
    for r in records:
        for n in r.get(key) or {}:
            if n not in names:
                names.append(n)
    return names


def _epoch_lines(ax, epochs):
    for r in epochs:
        ax.axvline(r["step"], color="0.8", linestyle=":", linewidth=1, zorder=0)


def _finish(fig, axes_labels, epochs, title, out_dir, name, written):
    """Epoch lines, axis labels and legends on every panel, then the figure saved as `name`."""
    import matplotlib.pyplot as plt

    for ax, label in axes_labels:
        _epoch_lines(ax, epochs)
        ax.set(xlabel="optimizer step", ylabel=label)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=120)
    plt.close(fig)
    written.append(name)


def write_plots(
    records: list[dict], out_dir: Path, title: str, steps: list[dict] | None = None
) -> list[str]:
    """`records`: metrics.jsonl (one per epoch); `steps`: steps.jsonl. Nothing is written when
    both are empty."""
    steps = list(steps or [])
    epochs = [r for r in records if "step" in r]
    if not steps and not epochs:
        return []
    written = []
    # A single point is drawn as a marker, more as a line with markers.
    style = {"marker": "o", "markersize": 3 if len(steps) > 1 else 6}

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    if steps:
        x = [r["step"] for r in steps]
        ax_loss.plot(x, [r["train_loss"] for r in steps], label="train", **style)
        ax_acc.plot(x, [r["train_top1"] for r in steps], label="train", **style)
    if epochs:
        x = [r["step"] for r in epochs]
        ax_loss.plot(x, [r["test_loss"] for r in epochs], "s--", label="test (epoch end)")
        ax_acc.plot(x, [r["test_top1"] for r in epochs], "s--", label="test (epoch end)")
    _finish(
        fig,
        ((ax_loss, "cross-entropy"), (ax_acc, "top-1 accuracy (%)")),
        epochs,
        title,
        out_dir,
        "accuracy.png",
        written,
    )

    source = steps if any("update_angle" in r for r in steps) else epochs
    panels = [
        (key, label)
        for key, label in (
            ("weight_angle", "forward-feedback weight angle (deg)"),
            ("update_angle", "update vs backprop angle (deg)"),
        )
        if _layer_names(source, key)
    ]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
        for ax, (key, _label) in zip(axes[0], panels):
            for name in _layer_names(source, key):
                points = [(r["step"], r[key][name]) for r in source if name in (r.get(key) or {})]
                ax.plot(
                    *zip(*points), label=name, marker="o", markersize=3 if len(points) > 1 else 6
                )
        _finish(
            fig,
            [(ax, label) for ax, (_, label) in zip(axes[0], panels)],
            epochs,
            title,
            out_dir,
            "alignment.png",
            written,
        )
    return written
