"""Networks from the paper, built from DTP blocks, and their plain-backprop twins."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import nn

from .nn import Conv2d, DTPBlock, Linear

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


_ACTIVATION_MODULES = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh}


def to_backprop(model: nn.Module) -> nn.Module:
    """A copy of a Sequential DTP model made of plain torch.nn modules (same forward weights),
    trained by ordinary backprop: the BP baseline on the same network."""
    layers = []
    for m in model:
        if not isinstance(m, DTPBlock):
            layers.append(m)
            continue
        if isinstance(m, Linear):
            op = nn.Linear(m.in_features, m.out_features, m.bias is not None)
        else:
            op = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                           m.dilation, m.groups, m.bias is not None)
        op = op.to(device=m.weight.device, dtype=m.weight.dtype)
        op.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("feedback")})
        layers.append(op)
        if m.activation:
            layers.append(_ACTIVATION_MODULES[m.activation]())
        if m.pool:
            layers.append(nn.MaxPool2d(m.pool))
    return nn.Sequential(*layers)
