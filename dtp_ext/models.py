"""Networks from the paper, built from DTP blocks."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import nn

from .nn import Conv2d, Linear

SIMPLE_VGG_CHANNELS = (128, 128, 256, 256, 512)


def simple_vgg(num_classes: int = 10, in_channels: int = 3,
               widths: Sequence[int] = SIMPLE_VGG_CHANNELS, beta: float = 0.7,
               input_size: int = 32) -> nn.Sequential:
    """SimpleVGG (SPEC §1): five conv3x3 (stride 1, padding 1) -> ELU -> maxpool 2x2 blocks
    named conv1..conv5, flatten, and `fc`: Linear(widths[-1] * (input_size/32)^2 -> classes).
    2,221,706 parameters for 10 classes on 32x32 inputs."""
    layers, cin = OrderedDict(), in_channels
    for i, c in enumerate(widths):
        layers[f"conv{i + 1}"] = Conv2d(cin, c, 3, padding=1, activation="elu", pool=2, beta=beta)
        cin = c
    side = input_size // 2 ** len(widths)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = Linear(cin * side * side, num_classes, beta=beta)
    return nn.Sequential(layers)
