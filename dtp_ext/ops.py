"""Typed wrappers over the compiled ops (torch.ops.dtp_ext.*) and their fake kernels.

This is the only module that touches torch.library. Each op's algorithm is written once in C++
(csrc/ops/block_ops.cpp) and registered for the CPU and, in CUDA builds, for CUDA; its fused
elementwise passes are private ops (torch.ops.dtp_ext._*) with one kernel per device
(csrc/cpu/, csrc/cuda/); the dispatcher picks the kernels from the tensors' device. There is
no Python fallback: if the compiled library is missing, importing dtp_ext fails.

Each op's arguments are written once, in its schema (csrc/dtp_ext.cpp): a wrapper below names
its parameters (with a BlockGeometry for the geometry arguments) and passes them on by the
schema's names (_call); the fake kernels read them by name too (_signatures.py).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

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
from . import _signatures, fake_kernels, loss_scaling


class NonFiniteInputError(ValueError):
    """A fused op refused a NaN/Inf input. The op raises it itself, however it was called (a
    wrapper here, torch.ops.dtp_ext, a torch.compile'd graph, a DTP block's backward), naming
    the op and the argument ("dtp_ext.<op>: <argument> contains non-finite values ..."), before
    it writes anything; `check_non_finite` raises it for a deferred check ("dtp_ext.<op>: an
    input contained non-finite values ... (a deferred check)"). A ValueError: `except
    ValueError` catches it too."""


# The compiled library raises its refusals of non-finite inputs as this type.
_C._set_non_finite_input_error(NonFiniteInputError)

_ops = torch.ops.dtp_ext

OP_NAMES = (
    "ldrl_loss",
    "ldrl_feedback_loop",
    "reconstruction_feedback_loop",
    "propagate_target",
    "block_weight_grad",
)
# The fused elementwise passes that the ops above call from C++, one kernel per device.
PRIVATE_OP_NAMES = (
    "_phi_unpool_difference",
    "_noisy_difference",
    "_sgd_momentum_update",
    "_activation_pool_backward",
)


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
        """The ops' geometry arguments, in their order (_signatures.GEOMETRY)."""
        return (
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            self.groups,
            self.activation,
            self.pool,
        )


# How each public op's arguments are passed: (name, conversion) in the schema's order; ints,
# floats and int lists are converted as the schema types them.
_CONVERSIONS = {"int": int, "float": float, "List[int]": list}
_ARGUMENTS = {
    op: tuple((name, _CONVERSIONS.get(kind)) for name, kind in _signatures.arguments(op))
    for op in OP_NAMES
}
_OPS = {op: getattr(_ops, op) for op in OP_NAMES}


def _call(op: str, arguments: dict):
    """torch.ops.dtp_ext.<op> on a wrapper's arguments (its locals()), passed by the schema's
    names: `geometry` (a BlockGeometry) gives the geometry arguments."""
    geometry = dict(zip(_signatures.GEOMETRY, arguments["geometry"].args()))
    values = []
    for name, convert in _ARGUMENTS[op]:
        value = geometry[name] if name in geometry else arguments[name]
        values.append(value if convert is None or value is None else convert(value))
    return _OPS[op](*values)


class LdrlLoss(NamedTuple):
    """What every `ldrl_loss` returns (ops, functional, reference.ldrl_loss_and_grads): the
    op's outputs, by their schema names."""

    loss: torch.Tensor
    grad_feedback_weight: torch.Tensor
    grad_feedback_bias: torch.Tensor


def ldrl_loss(
    x, weight, bias, feedback_weight, noise_x, noise_y, geometry: BlockGeometry
) -> LdrlLoss:
    """LdrlLoss(loss, grad_feedback_weight, grad_feedback_bias) of docs/maths.md §2 with explicit
    noise, on a block's tensors (functional.ldrl_loss takes the block)."""
    return LdrlLoss(*_call("ldrl_loss", locals()))


def ldrl_feedback_loop(
    x,
    weight,
    bias,
    feedback_weight,
    feedback_bias,
    momentum_weight,
    momentum_bias,
    iterations: int,
    noise_std: float,
    lr: float,
    momentum: float,
    weight_decay: float,
    chunk_iterations: int,
    geometry: BlockGeometry,
    noise_x=None,
    noise_y=None,
):
    """Runs the K-iteration L-DRL loop in place on the feedback weights; returns the losses."""
    return _call("ldrl_feedback_loop", locals())


def reconstruction_feedback_loop(
    x,
    weight,
    bias,
    feedback_weight,
    feedback_bias,
    momentum_weight,
    momentum_bias,
    iterations: int,
    noise_std: float,
    lr: float,
    momentum: float,
    weight_decay: float,
    chunk_iterations: int,
    geometry: BlockGeometry,
    noise_x=None,
):
    """Vanilla DTP's feedback training (reconstruction loss), in place; returns the losses."""
    return _call("reconstruction_feedback_loop", locals())


def propagate_target(
    output,
    indices,
    delta,
    feedback_weight,
    scale: float,
    input_sizes: Sequence[int],
    geometry: BlockGeometry,
    loss_scale: torch.Tensor | None = None,
):
    """delta_{n-1} = (G(s) - G(s - scale * delta)) / scale (docs/maths.md §3, scale = beta * B);
    with `loss_scale` k (a 0-d float64 CPU tensor, read when the op runs) the step is scale / k
    (docs/maths.md §6)."""
    return _call("propagate_target", locals())


def block_weight_grad(x, output, indices, delta, weight, geometry: BlockGeometry):
    """(grad_weight, grad_bias): the local vector-Jacobian product of delta through the block."""
    return _call("block_weight_grad", locals())


def set_finite_checks(enabled: bool) -> bool:
    """Every fused op checks its inputs for NaN/Inf (on by default): on the CPU it raises
    NonFiniteInputError (a ValueError) naming the argument before writing anything; on CUDA the
    check is deferred (see `deferred_finite_checks`), so it never synchronises the host. The
    check costs one reduction per input. Process-wide; returns the previous setting."""
    return _C.set_finite_checks(bool(enabled))


_DEFER_MODES = {"cuda": 0, "everywhere": 1, "nowhere": 2}


@contextlib.contextmanager
def deferred_finite_checks(where: str = "everywhere") -> Iterator[None]:
    """Where the finite checks are deferred: "cuda" (the default), "everywhere" or "nowhere".

    A deferred check does not stop the op: it records, in a flag tensor on the device, that an
    op saw a non-finite input, without a host synchronisation. FeedbackTrainer.step() reads the
    flags in its one synchronisation per step and refuses the step, naming the op; call
    `check_non_finite()` yourself (e.g. before `optimizer.step()`) to catch a non-finite
    backward pass before the optimizer applies it, or let torch.amp.GradScaler skip the step."""
    if where not in _DEFER_MODES:
        raise ValueError(
            f"deferred_finite_checks: where must be one of {sorted(_DEFER_MODES)}, got {where!r}"
        )
    previous = _C.defer_finite_checks(_DEFER_MODES[where])
    try:
        yield
    finally:
        _C.defer_finite_checks(previous)


def finite_checks_synchronise(device: torch.device) -> bool:
    """Whether the fused ops' finite checks on `device` read their result on the host (checks
    on, not deferred there, by the kernels' own rule): such a check cannot run inside a CUDA
    graph capture."""
    return finite_checks_enabled() and not _C.finite_checks_deferred_on(str(device))


def pending_non_finite(device) -> torch.Tensor | None:
    """The device's deferred flag: an int32 0-d tensor, 0 or the code of an op that saw a
    non-finite input since the last check (None before any deferred check on that device)."""
    return _C.pending_non_finite(str(torch.device(device)))


def non_finite_op(code: int) -> str:
    """The op a deferred flag's code stands for, e.g. 'dtp_ext.propagate_target'."""
    return _C.non_finite_op(int(code))


def clear_non_finite(device):
    _C.clear_non_finite(str(torch.device(device)))


def check_non_finite(device) -> None:
    """Reads the device's deferred flag (one synchronisation), clears it, and raises
    NonFiniteInputError (a ValueError) naming the op if one saw a non-finite input."""
    flag = pending_non_finite(device)
    code = 0 if flag is None else int(flag)
    clear_non_finite(device)
    if code:
        raise NonFiniteInputError(
            f"{non_finite_op(code)}: an input contained non-finite values (NaN or Inf) "
            "(a deferred check); every input of a fused op must be finite"
        )


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
    """Deprecated: `isinstance(exc, dtp_ext.NonFiniteInputError)`, which every refusal of a
    non-finite input (immediate or deferred check) is."""
    warnings.warn(
        "dtp_ext.ops.is_non_finite_input_error is deprecated: use "
        "isinstance(exc, dtp_ext.NonFiniteInputError)",
        DeprecationWarning,
        stacklevel=2,
    )
    return isinstance(exc, NonFiniteInputError)


def cpu_vector_kernels_enabled() -> bool:
    """Whether the CPU's channels-last 2x2 pooled passes run their AVX-512 window kernels (this
    CPU has AVX-512 F/BW/VL and they are switched on, the default); they give the scalar
    passes' results bit for bit."""
    return _C.cpu_vector_kernels()


def cpu_vector_windows_written() -> int:
    """Pool windows the AVX-512 kernels have written since the library loaded (each pass adds
    what its kernels wrote): what shows they ran."""
    return _C.cpu_vector_windows()


@contextlib.contextmanager
def cpu_vector_kernels(enabled: bool) -> Iterator[None]:
    """`with dtp_ext.ops.cpu_vector_kernels(False): ...` runs a block on the scalar passes."""
    previous = _C.set_cpu_vector_kernels(enabled)
    try:
        yield
    finally:
        _C.set_cpu_vector_kernels(previous)


def last_kernel() -> str:
    """The compiled kernel the dispatcher ran last on this thread, e.g.
    'dtp_ext::ldrl_feedback_loop[CPU]': each op records itself, with the device it ran on."""
    return _C.last_kernel()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether this build registered a kernel for torch.ops.dtp_ext.<op> on that key."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dtp_ext::{op}", dispatch_key)


# Fake (meta) kernels: sizes, strides and the data-free argument checks (fake_kernels.py).
for _name in OP_NAMES + PRIVATE_OP_NAMES:
    torch.library.register_fake(f"dtp_ext::{_name}")(fake_kernels.KERNELS[_name])


@torch.library.custom_op("dtp_ext::current_loss_scale", mutates_args=())
def current_loss_scale(like: torch.Tensor) -> torch.Tensor:
    """dtp_ext.current_loss_scale() of the thread that runs it, as a 0-d float64 CPU tensor
    (`like` only gives the op a tensor to dispatch on). An op, so a torch.compile'd backward
    reads the scale when it runs, on its own thread, where a Python float would be frozen into
    the graph when traced."""
    return torch.tensor(loss_scaling.current_loss_scale(), dtype=torch.float64)


@current_loss_scale.register_fake
def _(like):
    return torch.empty((), dtype=torch.float64, device="cpu")
