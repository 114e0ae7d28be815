"""torchvision architectures for `dtp-ext train --model NAME`, converted with dtp_ext.convert.

Built with random weights (`weights=None`, nothing is downloaded) and `num_classes` = the
dataset's classes, then adapted to the data and converted (`dtp_ext.convert(beta=...)`):

- the stem conv takes the data's channels (1 for MNIST);
- for small images (below 64x64: all of MNIST, Fashion-MNIST, CIFAR-10 and ImageNet 32x32) the
  early downsampling that would shrink them to a few pixels is removed, as the usual CIFAR
  variants do: see ADAPTATIONS (also in docs/training.md).

The result is not a chain: BatchNorm, residual adds, concatenations and functional calls sit
between the DTP blocks, so only `bp` and `ldrl` (whose difference targets flow through autograd)
train it.
"""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

import dtp_ext

from .config import ConfigError

SMALL = 64  # inputs below SMALL x SMALL get the small-image adaptations

ADAPTATIONS: Dict[str, str] = {
    "resnet18": "stem conv 7x7 stride 2 -> 3x3 stride 1 padding 1 and no max-pool (the CIFAR "
                "ResNet stem); 28x28 and 32x32 inputs then reach the last stage at 4x4",
    "vgg11_bn": "average pool to 1x1 instead of 7x7 and a 512 -> 4096 first classifier layer "
                "(instead of 25088 -> 4096, which would only see 49 copies of a 1x1 map); on "
                "inputs below 32x32 the last max-pool is dropped (28 -> 1x1 after four pools)",
    "mobilenet_v2": "stem conv stride 2 -> 1 (32x32 inputs reach the last stage at 2x2)",
    "squeezenet1_1": "stem conv stride 2 -> 1 with padding 1 (32x32 inputs reach the "
                     "classifier at 3x3 instead of 1x1)",
}


def _torchvision():
    try:
        import torchvision
    except ImportError:
        raise ConfigError("the torchvision models (--model " + "|".join(sorted(ADAPTATIONS)) + ") need "
                          "torchvision, an optional extra: pip install torchvision (or "
                          "pip install 'dtp_ext[vision]')") from None
    return torchvision


def _kaiming_conv(conv: nn.Conv2d, *, uniform: bool = False) -> nn.Conv2d:
    """torchvision's init of these networks' convs (squeezenet: kaiming uniform)."""
    if uniform:
        nn.init.kaiming_uniform_(conv.weight)
    else:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _resnet18(tv, channels: int, size: int, classes: int) -> nn.Module:
    model = tv.models.resnet18(weights=None, num_classes=classes)
    if size < SMALL:
        model.conv1 = _kaiming_conv(nn.Conv2d(channels, 64, 3, 1, 1, bias=False))
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = _kaiming_conv(nn.Conv2d(channels, 64, 7, 2, 3, bias=False))
    return model


def _vgg11_bn(tv, channels: int, size: int, classes: int) -> nn.Module:
    model = tv.models.vgg11_bn(weights=None, num_classes=classes)
    if channels != 3:
        model.features[0] = _kaiming_conv(nn.Conv2d(channels, 64, 3, padding=1))
    if size < SMALL:
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        first = nn.Linear(512, model.classifier[0].out_features)
        nn.init.normal_(first.weight, 0, 0.01)
        nn.init.zeros_(first.bias)
        model.classifier[0] = first
    if size < 32:
        model.features[len(model.features) - 1] = nn.Identity()
    return model


def _mobilenet_v2(tv, channels: int, size: int, classes: int) -> nn.Module:
    model = tv.models.mobilenet_v2(weights=None, num_classes=classes)
    stem = model.features[0][0]
    if size < SMALL or channels != 3:
        model.features[0][0] = _kaiming_conv(nn.Conv2d(channels, stem.out_channels, 3,
                                                       1 if size < SMALL else 2, 1, bias=False))
    return model


def _squeezenet1_1(tv, channels: int, size: int, classes: int) -> nn.Module:
    model = tv.models.squeezenet1_1(weights=None, num_classes=classes)
    if size < SMALL:
        model.features[0] = _kaiming_conv(nn.Conv2d(channels, 64, 3, 1, 1), uniform=True)
    elif channels != 3:
        model.features[0] = _kaiming_conv(nn.Conv2d(channels, 64, 3, 2), uniform=True)
    return model


BUILDERS: Dict[str, Callable] = {"resnet18": _resnet18, "vgg11_bn": _vgg11_bn,
                                 "mobilenet_v2": _mobilenet_v2, "squeezenet1_1": _squeezenet1_1}


def build_torchvision(name: str, channels: int, size: int, classes: int, beta: float) -> nn.Module:
    """torchvision's `name` (random weights), adapted to (channels, size) and converted."""
    plain = BUILDERS[name](_torchvision(), channels, size, classes)
    return dtp_ext.convert(plain, beta=beta, inplace=True)
