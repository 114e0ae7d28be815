"""build_info(): what this build of the kernels contains."""
from __future__ import annotations

import torch

from . import _C, ops


def build_info() -> dict:
    """Which kernels this build has (CPU, CUDA and archs) and the versions involved."""
    compiled = _C.build_info()
    kernels = {key.lower(): [op for op in ops.OP_NAMES if ops.has_kernel(op, key)]
               for key in ("CPU", "CUDA")}
    from . import __version__
    return {
        "dtp_ext_version": __version__,
        "torch_version": torch.__version__,
        "torch_version_built_against": compiled["torch_version_built"],
        "cpu_kernels": kernels["cpu"],
        "cuda_built": bool(compiled["cuda"]),
        "cuda_kernels": kernels["cuda"],
        "cuda_arch_list": compiled["cuda_arch_list"],
        "torch_cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "openmp": bool(compiled["openmp"]),
        "threads": torch.get_num_threads(),
    }
