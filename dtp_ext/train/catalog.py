"""The networks `dtp-ext train --model` knows (their definitions: dtp_ext/models.py): chains of
dtp_ext blocks (mnist-convnet, simplevgg), and torchvision architectures converted with
dtp_ext.convert (bp and ldrl only: BatchNorm, residual adds and concatenations sit between their
DTP blocks, and only those two algorithms' targets flow through autograd).

Every algorithm trains the same module (BP simply ignores the feedback buffers), so weights,
checkpoints and metrics have the same names whatever the algorithm. Each model also carries the
feedback hyper-parameters known to work for it (per trained block, forward order; the
torchvision models take one value for every trained block): MODELS is the one table of each
model's settings, which resolve.py, the presets and the command's help read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import dtp_ext
from dtp_ext.models import ADAPTATIONS, mnist_convnet, simple_vgg, torchvision_model

from .errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]  # (channels, size, classes, beta) -> model
    # Default (iterations, noise, lr) per trained block (a list) or for every trained block (a
    # scalar), by feedback loss: "ldrl", the reconstruction loss of "dtp"/"tp", and "drl"'s
    # direct output->layer feedback. None: FeedbackTrainer plans it per block
    # (dtp_ext.alignment, docs/maths.md §8).
    feedback: dict[str, tuple]
    min_size: int  # smallest square input it accepts
    about: str
    chain: bool = True  # an nn.Sequential of DTP blocks joined by Flatten
    # The paper's feedback iterations on a dataset where they differ from feedback["ldrl"]'s
    # (its presets, presets.py; other runs take the defaults).
    paper_iterations: dict[str, list[int]] = field(default_factory=dict)

    def feedback_defaults(self, algorithm: str):
        family = {"dtp": "reconstruction", "tp": "reconstruction"}.get(algorithm, algorithm)
        return self.feedback.get(family, self.feedback["ldrl"])


def _mnist_convnet(channels: int, size: int, classes: int, beta: float) -> nn.Sequential:
    return mnist_convnet(classes, channels, size, beta)


def _simplevgg(channels: int, size: int, classes: int, beta: float) -> nn.Sequential:
    return simple_vgg(classes, channels, beta=beta, input_size=size)


MODELS: dict[str, ModelSpec] = {
    # L-DRL values: docs/maths.md §14. The baselines' values were only checked to train stably on MNIST
    # for a few hundred steps (the reconstruction loss and DRL's Q diverge at L-DRL's lrs).
    "mnist-convnet": ModelSpec(
        _mnist_convnet,
        {
            "ldrl": ([20, 20], [0.2, 0.08], [1e-3, 0.18]),
            # reconstruction: conv2's G reaches its reconstruction floor within ~20 batches at lr
            # 1e-4 already; at 1e-3 a one-epoch TP run diverged after ~400 steps (its SGD becomes
            # unstable as conv1's activity grows), at 3e-3 even the feedback-only loop did.
            "reconstruction": ([20, 20], [0.2, 0.08], [1e-4, 1e-3]),
            "drl": ([20, 20], [0.1, 0.1], [1e-4, 1e-4]),
        },
        16,
        "conv5x5 16 ELU pool2, conv5x5 32 ELU pool2, linear",
    ),
    "simplevgg": ModelSpec(
        _simplevgg,
        {
            "ldrl": (
                [20, 30, 35, 55, 20],
                [0.4, 0.4, 0.2, 0.2, 0.08],
                [1e-4, 3.5e-4, 8e-3, 8e-3, 0.18],
            ),
            "reconstruction": (
                [20, 30, 35, 55, 20],
                [0.4, 0.4, 0.2, 0.2, 0.08],
                [1e-5, 3.5e-5, 8e-4, 8e-4, 1e-3],
            ),
            "drl": ([20, 30, 35, 55, 20], [0.1] * 5, [1e-5] * 5),
        },
        32,
        "5 x (conv3x3 ELU pool2), channels 128-128-256-256-512, linear",
        paper_iterations={"imagenet32": [25, 35, 40, 60, 25]},  # docs/maths.md §14
    ),
}


def _torchvision_spec(name: str, about: str) -> ModelSpec:
    # Iterations and lr planned per block by FeedbackTrainer from each block's shape and batch
    # (its noise floor, docs/maths.md §8), noise 0.1: the library's defaults, nothing per model.
    return ModelSpec(
        lambda channels, size, classes, beta: build_torchvision(
            name, channels, size, classes, beta
        ),
        {"ldrl": (None, None, None)},
        28,
        f"torchvision {name}, converted ({about}; small images: {ADAPTATIONS[name]})",
        chain=False,
    )


MODELS.update(
    {
        "resnet18": _torchvision_spec(
            "resnet18", "21 DTP blocks, BatchNorm and residual adds between them"
        ),
        "vgg11_bn": _torchvision_spec("vgg11_bn", "11 DTP blocks, BatchNorm between them"),
        "mobilenet_v2": _torchvision_spec(
            "mobilenet_v2", "53 DTP blocks, BatchNorm, ReLU6 and residual adds"
        ),
        "squeezenet1_1": _torchvision_spec(
            "squeezenet1_1", "26 DTP blocks, concatenated Fire branches"
        ),
        "resnet-small": _torchvision_spec(
            "resnet-small",
            "torchvision BasicBlocks 16/32/64 wide, two per "
            "stage: 16 DTP blocks, BatchNorm and residual adds",
        ),
    }
)

DEFAULT_MODEL = {
    "mnist": "mnist-convnet",
    "fashion-mnist": "mnist-convnet",
    "cifar10": "simplevgg",
    "imagenet32": "simplevgg",
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ConfigError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name]


def build_model(name: str, channels: int, size: int, classes: int, beta: float) -> nn.Module:
    spec = model_spec(name)
    if size < spec.min_size:
        raise ConfigError(
            f"model {name!r} needs inputs of at least {spec.min_size}x{spec.min_size}, "
            f"the dataset has {size}x{size}"
        )
    return spec.build(channels, size, classes, beta)


def trained_block_count(name: str, channels: int, size: int, classes: int) -> int:
    """Feedback blocks that get trained: every DTP block but the first, the one fed by the data
    (docs/maths.md §1). The torchvision networks are counted on the meta device (no memory, no init
    cost); each has exactly one block that sees the data, its stem conv."""
    spec = model_spec(name)
    if spec.chain:
        return len(spec.feedback["ldrl"][0])
    return len(trained_block_positions(name, channels, size, classes))


def build_torchvision(name: str, channels: int, size: int, classes: int, beta: float) -> nn.Module:
    """torchvision's `name` (random weights), adapted to (channels, size) and converted."""
    try:
        plain = torchvision_model(name, channels, size, classes)
    except ImportError as exc:
        raise ConfigError(f"--model {name}: {exc}") from None
    return dtp_ext.convert(plain, beta=beta, inplace=True)


def block_positions(model: nn.Module, input_shape) -> list[tuple[str, int]]:
    """(name, P) for every DTP block in forward execution order, from one eval-mode pass on
    an input of `input_shape` (C, H, W) on the model's device (the meta device works): P is the
    block's output positions per sample (H x W of a conv block's output, after its pool; 1 for
    a Linear on (batch, features)). The pass runs through `backprop_twin`, plain torch ops:
    the blocks record nothing."""
    twin = dtp_ext.reference.backprop_twin(model).eval()
    order = []

    def record(name):
        def hook(module, inputs, output):
            features = output.shape[1] if output.dim() == 4 else output.shape[-1]
            order.append((name, output.numel() // (output.shape[0] * features)))

        return hook

    blocks = {id(block) for _, block in dtp_ext.dtp_blocks(model)}
    hooks = [
        m.register_forward_hook(record(name))
        for name, m in twin.named_modules()
        if id(getattr(m, "block", None)) in blocks
    ]
    try:
        with torch.no_grad():
            twin(torch.zeros((1, *input_shape), device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return order


def trained_block_positions(
    name: str, channels: int, size: int, classes: int
) -> list[tuple[str, int]]:
    """block_positions of the blocks whose feedback is trained: every block after the first
    one executed, the stem conv, the only block these networks feed with the data. Built on
    the meta device: no memory, no init cost."""
    with torch.device("meta"):
        model = build_torchvision(name, channels, size, classes, 0.7)
        return block_positions(model, (channels, size, size))[1:]
