"""build_info(): what this build of the kernels contains."""

from __future__ import annotations

import re

import torch

from . import _C, ops


def parse_arch_list(arch_list: str) -> tuple[list[str], list[str]]:
    """The machine code (SASS) and PTX archs of a canonical TORCH_CUDA_ARCH_LIST as setup.py
    records it: '8.0;9.0+PTX' -> (['sm_80', 'sm_90'], ['compute_90']). Entries it cannot read
    (a build older than that record, e.g. 'native GPU') are left out."""
    sass, ptx = [], []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        m = re.fullmatch(r"(\d+)\.(\d)([a-z]?)(\+PTX)?", entry)
        if not m:
            continue
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        sass.append(f"sm_{num}")
        if m.group(4):
            ptx.append(f"compute_{num}")
    return sass, ptx


def _arch(name: str) -> tuple[int, int, str]:
    m = re.fullmatch(r"(?:sm|compute)_(\d+)(\d)([a-z]?)", name)
    return int(m.group(1)), int(m.group(2)), m.group(3)


def kernel_image_for(capability: tuple[int, int], sass: list[str], ptx: list[str]) -> str | None:
    """Which of the build's device code a GPU of this compute capability runs: machine code
    of its major version and a minor no higher (an 'a' arch: that exact GPU only), else PTX of
    an arch no newer, which the driver compiles at first use; None: 'no kernel image is
    available' on that GPU."""
    major, minor = capability
    for name in sorted(sass, key=_arch, reverse=True):
        a_major, a_minor, suffix = _arch(name)
        if a_major == major and (a_minor == minor if suffix == "a" else a_minor <= minor):
            return f"{name} machine code"
    for name in sorted(ptx, key=_arch, reverse=True):
        a_major, a_minor, suffix = _arch(name)
        if (a_major, a_minor) <= (major, minor) and (
            suffix == "" or (a_major, a_minor) == (major, minor)
        ):
            return f"{name} PTX (compiled by the driver at first use)"
    return None


def build_info() -> dict:
    """Which kernels this build has (CPU, CUDA and archs) and the versions involved. With a GPU
    visible, also its compute capability and which of the build's device code it runs
    (`cuda_device_image`, None when the build has none for it)."""
    compiled = _C.build_info()
    kernels = {
        key.lower(): [op for op in ops.OP_NAMES if ops.has_kernel(op, key)]
        for key in ("CPU", "CUDA")
    }
    sass, ptx = parse_arch_list(compiled["cuda_arch_list"])
    from . import __version__

    info = {
        "dtp_ext_version": __version__,
        "torch_version": torch.__version__,
        "torch_version_built_against": compiled["torch_version_built"],
        "cpu_kernels": kernels["cpu"],
        "cuda_built": bool(compiled["cuda"]),
        "cuda_kernels": kernels["cuda"],
        "cuda_arch_list": compiled["cuda_arch_list"],
        "cuda_sass_archs": sass,
        "cuda_ptx_archs": ptx,
        "torch_cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "openmp": bool(compiled["openmp"]),
        "threads": torch.get_num_threads(),
    }
    if info["cuda_available"]:
        capability = torch.cuda.get_device_capability()
        info["cuda_device"] = torch.cuda.get_device_name()
        info["cuda_device_capability"] = f"{capability[0]}.{capability[1]}"
        info["cuda_device_image"] = (
            kernel_image_for(capability, sass, ptx) if info["cuda_built"] else None
        )
    return info
