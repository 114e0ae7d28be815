"""Counts the compute operations (the kernels a GPU would launch) per feedback iteration.

torch.profiler on the CPU records every ATen call the loop makes; the leaves that do work
(not views, allocations or dtype/layout wrappers) are the kernel launches the same code makes
on a GPU. Per iteration = (ops in a 2K-iteration call - ops in a K-iteration call) / K, all
iterations of a call batched in one chunk, as FeedbackTrainer runs them.

    python benchmarks/count_launches.py
"""

from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

import dtp_ext

METADATA = {
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::view",
    "aten::as_strided",
    "aten::narrow",
    "aten::slice",
    "aten::select",
    "aten::split",
    "aten::t",
    "aten::transpose",
    "aten::unsqueeze",
    "aten::flatten",
    "aten::reshape",
    "aten::expand",
    "aten::resize_",
    "aten::resolve_conj",
    "aten::result_type",
    "aten::as_strided_",
    "aten::alias",
    "aten::detach",
    "aten::lift_fresh",
    "aten::_reshape_alias",
    "aten::unbind",
    "aten::squeeze",
    "aten::permute",
    "aten::_unsafe_view",
    # wrappers whose work, if any, is a child copy_
    "aten::to",
    "aten::_to_copy",
    "aten::contiguous",
    "aten::clone",
}


def launches_of(event, counts):
    """An ATen call that does work is one launch (what it calls inside is the same kernel or a
    CPU-only detail, e.g. wrapping a Python scalar into a tensor); dtp_ext's own record
    functions and layout wrappers count what they contain."""
    for child in event.cpu_children:
        if child.name in METADATA or child.name.startswith("dtp_ext::"):
            before = sum(counts.values())
            launches_of(child, counts)
            if child.name.startswith("dtp_ext::") and sum(counts.values()) == before:
                counts[child.name] += 1  # a fused pass of our own
        elif child.name.startswith("aten::"):
            counts[child.name] += 1


def launches(loop, block, x, iterations):
    state = [
        block.feedback_weight.clone(),
        block.feedback_bias.clone(),
        torch.zeros_like(block.feedback_weight),
        torch.zeros_like(block.feedback_bias),
    ]
    args = (
        x,
        block.weight.detach(),
        block.bias.detach(),
        *state,
        iterations,
        0.1,
        1e-3,
        0.9,
        0.0,
        iterations,
        block.geometry(),
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loop(*args)
    counts = Counter()
    for event in prof.events():
        if (
            event.name.startswith("dtp_ext::")
            and event.name.endswith("_loop")
            and event.cpu_parent is None
        ):
            launches_of(event, counts)
    return counts


def per_iteration(loop, block, x, k=10):
    a, b = launches(loop, block, x, k), launches(loop, block, x, 2 * k)
    return {n: (b[n] - a[n]) / k for n in b if b[n] != a[n]}


BLOCKS = {
    # 4x4 maps: below the CPU's channels-last threshold (64 padded input positions) and above
    # its float32 im2col route (4 output positions), so the CPU runs the GPU's sequence,
    # without layout conversions a GPU skips.
    "conv 16->16, ELU, pool 2, 4x4 maps": (
        lambda: dtp_ext.Conv2d(16, 16, 3, padding=1, activation="elu", pool=2),
        (4, 16, 4, 4),
    ),
    "linear 32->16, tanh": (lambda: dtp_ext.Linear(32, 16, activation="tanh"), (8, 32)),
}

if __name__ == "__main__":
    torch.manual_seed(0)
    for loop_name in ("ldrl_feedback_loop", "reconstruction_feedback_loop"):
        loop = getattr(dtp_ext.ops, loop_name)
        for name, (make, shape) in BLOCKS.items():
            ops = per_iteration(loop, make(), torch.randn(shape))
            print(f"{loop_name}, {name}: {sum(ops.values()):g} compute ops per iteration")
            for op, n in sorted(ops.items(), key=lambda t: (-t[1], t[0])):
                print(f"    {n:4g}  {op}")
