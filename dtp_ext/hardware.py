"""What the machine computes natively: whether bfloat16 products are native here (so that
bfloat16 is faster than float32) or emulated (several times slower)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

# CPU flags (Linux /proc/cpuinfo) of native bfloat16 products, as oneDNN uses them.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux: /proc/cpuinfo's 'flags' or 'Features'); empty elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def missing_bfloat16(device: str | torch.device = "cpu") -> str | None:
    """None where `device` has native bfloat16 products, else what it lacks (for messages)."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return None
        major, minor = torch.cuda.get_device_capability(device)
        return f"a GPU of compute capability 8.0 or above (this one is {major}.{minor})"
    flags = cpu_flags()
    if any(f in flags for f in BF16_CPU_FLAGS) or "bf16" in flags:  # x86, or Arm's BF16
        return None
    return (
        f"a CPU with AVX512-BF16 or AMX-BF16 ({platform.processor() or platform.machine()} has "
        "neither: bfloat16 products are emulated in float32, several times slower)"
    )


def preferred_compute_dtype(device: str | torch.device = "cpu") -> torch.dtype | None:
    """torch.bfloat16 where `device` computes it natively, else None (float32): what
    `dtp-ext train --precision auto` and FeedbackTrainer(compute_dtype=...) users should pick."""
    return torch.bfloat16 if missing_bfloat16(device) is None else None
