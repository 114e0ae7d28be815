"""Typed wrappers over the compiled ops (torch.ops.dtp_ext.*) and their fake kernels.

This is the only module that touches torch.library. Each op is implemented in C++ for the CPU
(csrc/ldrl/ldrl_cpu.cpp) and, in CUDA builds, for CUDA (csrc/ldrl/ldrl_cuda.cu); the dispatcher
picks the kernel from the tensors' device. There is no Python fallback: if the compiled library
is missing, importing dtp_ext fails.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as exc:  # a source tree without its build, or a build for another torch
    import os as _os
    raise ImportError(
        f"dtp_ext: the compiled kernels (dtp_ext._C) cannot be loaded from "
        f"{_os.path.dirname(__file__)} ({exc}). Build them where this package lives: "
        "`pip install --no-build-isolation -e .` in the repository (an editable install builds "
        "_C in place), or `python setup.py build_ext --inplace`. If dtp_ext is installed "
        "elsewhere, a source tree in the current folder shadows it: run from another folder."
    ) from exc
from . import fake_kernels

_ops = torch.ops.dtp_ext

OP_NAMES = ("ldrl_loss", "ldrl_feedback_loop", "reconstruction_feedback_loop", "propagate_target",
            "block_weight_grad")


@dataclass(frozen=True)
class BlockGeometry:
    """What the kernels need to know about a block besides its tensors."""

    stride: tuple = ()
    padding: tuple = ()
    dilation: tuple = ()
    groups: int = 1
    activation: str = "none"
    pool: int = 0

    def args(self):
        return (list(self.stride), list(self.padding), list(self.dilation), self.groups,
                self.activation, self.pool)


def ldrl_loss(x, weight, bias, feedback_weight, noise_x, noise_y, geometry: BlockGeometry):
    """(loss, grad_feedback_weight, grad_feedback_bias) of SPEC §2.1 with explicit noise."""
    return _ops.ldrl_loss(x, weight, bias, feedback_weight, noise_x, noise_y, *geometry.args())


def ldrl_feedback_loop(x, weight, bias, feedback_weight, feedback_bias, momentum_weight,
                       momentum_bias, iterations: int, noise_std: float, lr: float,
                       momentum: float, weight_decay: float, chunk_iterations: int,
                       geometry: BlockGeometry, noise_x=None, noise_y=None):
    """Runs the K-iteration L-DRL loop in place on the feedback weights; returns the losses."""
    return _ops.ldrl_feedback_loop(
        x, weight, bias, feedback_weight, feedback_bias, momentum_weight, momentum_bias,
        int(iterations), float(noise_std), float(lr), float(momentum), float(weight_decay),
        int(chunk_iterations), noise_x, noise_y, *geometry.args())


def reconstruction_feedback_loop(x, weight, bias, feedback_weight, feedback_bias, momentum_weight,
                                 momentum_bias, iterations: int, noise_std: float, lr: float,
                                 momentum: float, weight_decay: float, chunk_iterations: int,
                                 geometry: BlockGeometry, noise_x=None):
    """Vanilla DTP's feedback training (reconstruction loss), in place; returns the losses."""
    return _ops.reconstruction_feedback_loop(
        x, weight, bias, feedback_weight, feedback_bias, momentum_weight, momentum_bias,
        int(iterations), float(noise_std), float(lr), float(momentum), float(weight_decay),
        int(chunk_iterations), noise_x, *geometry.args())


def propagate_target(output, indices, delta, feedback_weight, scale: float,
                     input_sizes: Sequence[int], geometry: BlockGeometry):
    """delta_{n-1} = (G(s) - G(s - scale * delta)) / scale (SPEC §3, scale = beta * B)."""
    return _ops.propagate_target(output, indices, delta, feedback_weight, float(scale),
                                 list(input_sizes), *geometry.args())


def block_weight_grad(x, output, indices, delta, weight, geometry: BlockGeometry):
    """(grad_weight, grad_bias): the local vector-Jacobian product of delta through the block."""
    return _ops.block_weight_grad(x, output, indices, delta, weight, *geometry.args())


def set_finite_checks(enabled: bool) -> bool:
    """Every fused op rejects NaN/Inf inputs with a ValueError naming the argument (on by
    default). The check costs one reduction per input and, on a GPU, one host synchronisation
    per op call; turn it off only where that matters (e.g. CUDA graph capture). Process-wide;
    returns the previous setting."""
    return _C.set_finite_checks(bool(enabled))


def finite_checks_enabled() -> bool:
    return _C.finite_checks()


@contextlib.contextmanager
def finite_checks(enabled: bool) -> Iterator[None]:
    """`with dtp_ext.ops.finite_checks(False): ...` runs a block with the checks set so."""
    previous = set_finite_checks(enabled)
    try:
        yield
    finally:
        set_finite_checks(previous)


def is_non_finite_input_error(exc: BaseException) -> bool:
    """Whether `exc` is a fused op refusing a NaN/Inf input (the C++ check raises ValueError)."""
    return isinstance(exc, ValueError) and "contains non-finite values" in str(exc)


def last_kernel() -> str:
    """The compiled kernel the dispatcher ran last on this thread, e.g.
    'dtp_ext::ldrl_feedback_loop[CPU]': each device's kernel records itself when it runs."""
    return _C.last_kernel()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether this build registered a kernel for torch.ops.dtp_ext.<op> on that key."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dtp_ext::{op}", dispatch_key)


# Fake (meta) kernels: sizes, strides and the data-free argument checks (fake_kernels.py).
for _name in OP_NAMES:
    torch.library.register_fake(f"dtp_ext::{_name}")(getattr(fake_kernels, _name))
