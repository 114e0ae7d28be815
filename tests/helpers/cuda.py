"""The GPU gate of the CUDA tests: skipped where no GPU is visible (CI); where one is, a build
without the CUDA kernels fails them (whatever DTP_EXT_CUDA says) instead of skipping to a green
run."""

import copy
import functools

import pytest
import torch

from dtp_ext import ops

HAS_GPU = torch.cuda.is_available()
HAS_CUDA_KERNELS = ops.has_kernel("ldrl_feedback_loop", "CUDA")

MISSING = (
    "a GPU is visible but dtp_ext was built without its CUDA kernels: rebuild with "
    "DTP_EXT_CUDA=1 pip install --no-build-isolation -e ."
)


def needs_cuda(test):
    """Skipped without a GPU; with one, fails (never skips) when the CUDA kernels are missing.
    (A wrapper, not a fixture, so that any test module can use it.)"""

    @functools.wraps(test)
    def run(*args, **kwargs):
        if not HAS_CUDA_KERNELS:
            pytest.fail(MISSING)
        return test(*args, **kwargs)

    return pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")(run)


# The devices a check runs on, as a parameter: the CPU always, CUDA where a GPU is visible.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="needs a GPU"))]


def require_device(device: str) -> None:
    """Inside a test parametrised by DEVICES: on a GPU machine a build without the CUDA
    kernels fails the CUDA case instead of skipping it."""
    if device == "cuda" and not HAS_CUDA_KERNELS:
        pytest.fail(MISSING)


def on_cuda(block, *tensors):
    return (copy.deepcopy(block).cuda(),) + tuple(
        t.cuda() if t is not None else None for t in tensors
    )
