"""How far the L-DRL update of a converted torchvision network is from backprop's with the
library's defaults (`FeedbackTrainer(model)`, nothing tuned per model), during a feedback-only
warm-up, and what a training step at those defaults costs against a backprop step.

Each network is built as `dtp-ext train --model NAME` builds it for MNIST (random weights,
adapted to 1x28x28, converted with dtp_ext.convert's defaults; docs/training.md). The warm-up
trains the feedback weights alone on consecutive MNIST training batches (forward pass +
FeedbackTrainer.step(), no forward-weight update), as `--feedback-only-steps` does. At each
checkpoint one fixed batch (MNIST training images 32000..) measures, per DTP block:

- the angle between the L-DRL update (the weight gradient of the DTP backward, with the
  feedback weights the targets use) and backprop's gradient of the same loss, both in training
  mode on copies of the model with the same dropout masks and BatchNorm batch statistics;
- the norm ratio |L-DRL update| / |backprop gradient|;
- the feedback weight's angle to W^T: of the trained V ("raw") and of the weight targets use
  (its average over steps), next to the planned floor the trainer predicted for each
  (dtp_ext.alignment, docs/maths.md §7).

A name `tv:NAME` (e.g. `tv:resnet50`) is instead torchvision.models.NAME(num_classes=10) as it
is, random weights, converted with `dtp_ext.convert`'s defaults, on MNIST padded to 32x32 and
repeated to three channels: what a user gets from a network the catalog does not adapt.

The output block's update is backprop's exactly: update summaries are over the other blocks.
After the warm-up, `--timed-steps` training steps of L-DRL (forward, trainer.step(), backward,
SGD step) and of backprop (the same network through dtp_ext.reference.backprop_twin) alternate;
their medians give the step-cost ratio, and the backprop step x the steps of one MNIST epoch
gives the epoch time the warm-up is compared with (an estimate from those timed steps).

    python benchmarks/torchvision_warmup.py [--models resnet-small,resnet18,tv:resnet50,...]
        [--steps 0,20,100] [--batch 32] [--timed-steps 5] [--threads N] [--json FILE]
        [--feedback-only-max-cost X]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

import dtp_ext
from dtp_ext.metrics import angle_degrees, weight_alignment
from dtp_ext.reference import backprop_twin
from dtp_ext.train.batches import normalise
from dtp_ext.train.catalog import block_positions, build_model
from dtp_ext.train.datasets import INFO, load_split

MODELS = ("resnet-small", "resnet18", "vgg11_bn", "mobilenet_v2", "squeezenet1_1")
AS_IS = "tv:"  # a torchvision network as it is (see the docstring)


def build(name, info):
    """(converted model, per-sample input shape, uint8 images -> model input) for `name`."""

    def mnist(images):
        return normalise(images, info.mean, info.std)

    if not name.startswith(AS_IS):
        model = build_model(name, info.channels, info.size, info.classes, 0.7)
        return model, (info.channels, info.size, info.size), mnist
    import torchvision

    plain = getattr(torchvision.models, name[len(AS_IS) :])(num_classes=info.classes)

    def padded(images):  # 28x28 -> 32x32 (0: MNIST's background), grey -> RGB
        return mnist(F.pad(images, (2, 2, 2, 2))).repeat(1, 3, 1, 1)

    return dtp_ext.convert(plain), (3, 32, 32), padded


def directions(model, x, y):
    """{block: (L-DRL update, backprop gradient)} on copies of `model`, training mode."""
    grads = []
    for kind in ("ldrl", "bp"):
        m = copy.deepcopy(model).train()
        net = m if kind == "ldrl" else backprop_twin(m).train()
        with torch.random.fork_rng():
            torch.manual_seed(1234)  # the same dropout masks for both
            loss = F.cross_entropy(net(x), y)
        blocks = dtp_ext.dtp_blocks(m)
        grads.append(
            dict(
                zip(
                    [n for n, _ in blocks], torch.autograd.grad(loss, [b.weight for _, b in blocks])
                )
            )
        )
    return {n: (grads[0][n], grads[1][n]) for n in grads[0]}


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(model, trainer, x, y, order, quality):
    """Per block, and summaries: updates over the blocks before the output block (its update
    is backprop's), feedback angles over the trained blocks."""
    rows = {}
    blocks = dict(dtp_ext.dtp_blocks(model))
    plans = {n: trainer.plans.get(n) for n in order}
    for name, (g, g_bp) in directions(model, x, y).items():
        row = {
            "update_angle": angle_degrees(g, g_bp),
            "norm_ratio": float(g.norm() / g_bp.norm()),
        }
        plan = plans.get(name)
        # Taps weighed by their use on the block's map (docs/maths.md §12).
        row["weight_angle"] = weight_alignment(
            blocks[name], plan.shape.tap_use if plan is not None else (1.0,)
        )["angle"]
        if plan is not None:
            row.update(
                iterations=plan.iterations,
                copies=plan.copies,
                lr=plan.lr,
                positions=plan.shape.positions,
                predicted_raw_angle=plan.raw_floor.angle,
                predicted_angle=plan.floor.angle,
            )
        if name in quality:
            row["raw_weight_angle"] = quality[name]["raw_angle"]
            row["raw_norm_ratio"] = quality[name]["raw_norm_ratio"]
        rows[name] = row
    result = {
        key: summary([rows[n][key] for n in names])
        for key, names in (
            ("update_angle", order[:-1]),
            ("norm_ratio", order[:-1]),
            ("weight_angle", order[1:]),
        )
    }
    result["output_block_angle"] = rows[order[-1]]["update_angle"]
    return result, rows


def timed_steps(model, data, prepare, batch, count, options):
    """Median seconds of an L-DRL training step at the defaults and of a backprop step, the
    two alternating (same weights at the start; each trains its own copy)."""
    ldrl = copy.deepcopy(model)
    trainer = dtp_ext.FeedbackTrainer(ldrl, **options)
    trainer.load_state_dict(TRAINERS[id(model)].state_dict())
    bp = backprop_twin(copy.deepcopy(model))
    opts = {
        "ldrl": torch.optim.SGD(ldrl.parameters(), lr=0.01, momentum=0.9),
        "bp": torch.optim.SGD(bp.parameters(), lr=0.01, momentum=0.9),
    }
    times = {"ldrl": [], "bp": []}
    for i in range(count + 1):  # the first round warms the allocator and oneDNN up
        x = prepare(data.images[i * batch : (i + 1) * batch])
        y = data.labels[i * batch : (i + 1) * batch]
        for kind, net in (("ldrl", ldrl), ("bp", bp)):
            net.train()
            start = time.perf_counter()
            out = net(x)
            if kind == "ldrl":
                trainer.step()
            opts[kind].zero_grad()
            F.cross_entropy(out, y).backward()
            opts[kind].step()
            if i:
                times[kind].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


TRAINERS: dict[int, dtp_ext.FeedbackTrainer] = {}


def run(name, steps, batch, data, info, timed, options):
    torch.manual_seed(0)
    model, shape, prepare = build(name, info)
    order = [n for n, _ in block_positions(model, shape)]
    trainer = TRAINERS[id(model)] = dtp_ext.FeedbackTrainer(model, **options)

    def images(i, n=batch):
        return (prepare(data.images[i : i + n]), data.labels[i : i + n])

    probe = images(32000)
    results, seconds, quality = [], 0.0, {}  # seconds: the warm-up steps' own time
    for step in range(0, max(steps) + 1):
        if step:
            x, _ = images((step - 1) * batch)
            start = time.perf_counter()
            model.train()
            model(x)
            quality = trainer.step().alignment()
            seconds += time.perf_counter() - start
        if step in steps:
            result, rows = measure(model, trainer, *probe, order, quality)
            results.append({"warmup_steps": step, "seconds": seconds, **result})
            report(name, results[-1])
    out = {
        "model": name,
        "blocks": len(order),
        "explain": trainer.explain(),
        "checkpoints": results,
        "final_blocks": rows,
    }
    if timed:
        t = timed_steps(model, data, prepare, batch, timed, options)
        epoch = t["bp"] * (len(data) // batch)
        out["step_seconds"] = t
        out["step_ratio"] = t["ldrl"] / t["bp"]
        out["bp_epoch_seconds_estimate"] = epoch
        print(
            f"{name:<14} step: L-DRL {t['ldrl']:.3f} s, backprop {t['bp']:.3f} s, ratio "
            f"{t['ldrl'] / t['bp']:.2f}x (median of {timed}); warm-up {results[-1]['seconds']:.0f} s "
            f"vs one backprop epoch ~{epoch:.0f} s ({len(data) // batch} steps)",
            flush=True,
        )
    return out


def copies(b) -> str:
    """' x S' for a block whose iterations each ran on S noise copies of its batch."""
    return f" × {b['copies']}" if b.get("copies", 1) > 1 else ""


def block_table(row) -> str:
    """Markdown: per trained block, its planned settings, predicted floors and what was
    measured after the last checkpoint (the feedback weight's angle to W^T: the trained V, and
    the weight targets use), and its update against backprop's."""
    steps = row["checkpoints"][-1]["warmup_steps"]
    lines = [
        f"{row['model']}, after {steps} warm-up steps",
        "",
        "| block | P | iterations (× noise copies) | lr | V: predicted floor | V: measured | targets' weight: "
        "predicted | measured | update vs BP | norm ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, b in row["final_blocks"].items():
        if "iterations" not in b:
            continue
        lines.append(
            f"| {name} | {b['positions']} | {b['iterations']}{copies(b)} | {b['lr']:.3g} | "
            f"{b['predicted_raw_angle']:.1f}° | {b.get('raw_weight_angle', float('nan')):.1f}° | "
            f"{b['predicted_angle']:.1f}° | {b['weight_angle']:.1f}° | {b['update_angle']:.1f}° | "
            f"{b['norm_ratio']:.2f} |"
        )
    return "\n".join(lines)


def report(name, r):
    u, n, w = r["update_angle"], r["norm_ratio"], r["weight_angle"]
    print(
        f"{name:<14}{r['warmup_steps']:>6}{r['seconds']:>8.0f}  update vs BP {u['median']:5.1f}° "
        f"[{u['min']:5.1f}, {u['max']:5.1f}]  norm ratio {n['median']:8.3g} [{n['min']:.3g}, {n['max']:.3g}]"
        f"  feedback angle {w['median']:5.1f}° (max {w['max']:5.1f})  output block {r['output_block_angle']:.1e}°",
        flush=True,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--steps", default="0,20,100", help="warm-up steps to measure at (comma list)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--timed-steps", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument(
        "--feedback-only-max-cost",
        type=float,
        help="FeedbackTrainer's feedback_only_max_cost (default: the library's)",
    )
    p.add_argument("--json")
    p.add_argument("--table", metavar="JSON", help="print the per-block tables of a --json file")
    args = p.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print("\n\n".join(block_table(row) for row in json.load(f)["rows"]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    from conftest import cpu_features  # the benchmarks' CPU line

    steps = sorted(int(s) for s in args.steps.split(","))
    info = INFO["mnist"]
    data = load_split("mnist", None, "train")
    print(
        f"MNIST, batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"seed 0 (one seed); {cpu_features()}"
    )
    print(
        f"{'model':<14}{'warm-up':>6}{'s':>8}  (median [min, max] over blocks; see the docstring)"
    )
    options = {}
    if args.feedback_only_max_cost is not None:
        options["feedback_only_max_cost"] = args.feedback_only_max_cost
        print(f"FeedbackTrainer options: {options}")
    rows = [
        run(name, steps, args.batch, data, info, args.timed_steps, options)
        for name in args.models.split(",")
    ]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "batch": args.batch,
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "cpu": cpu_features(),
                    "trainer_options": options,
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
