"""Networks from the paper, built from DTP blocks, and their plain-backprop twins."""
from __future__ import annotations

import copy
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


class _PlainBlock(nn.Module):
    """A DTP block's forward as ordinary autograd ops on the block's own weight tensors."""

    def __init__(self, block: DTPBlock):
        super().__init__()
        self.__dict__["block"] = block  # not a submodule: the twin holds no parameters of its own

    def forward(self, x):
        from .block_math import forward_block

        block = self.block
        if isinstance(block, Linear):
            rows = forward_block(block, x.reshape(-1, block.in_features))[0]
            return rows.reshape(*x.shape[:-1], block.out_features)
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d accepts
            return forward_block(block, x.unsqueeze(0))[0].squeeze(0)
        return forward_block(block, x)[0]

    def extra_repr(self):
        return f"backprop through {type(self.block).__name__}"


def backprop_twin(model: nn.Module) -> nn.Module:
    """The same network computing plain backprop, for any model (chains, residual networks,
    converted torchvision models): a structural copy that shares every parameter and buffer
    with `model` (gradients land in `model`'s parameters, BatchNorm statistics are updated in
    `model`'s buffers) and runs each DTP block's op, activation and max-pool with ordinary
    autograd. Modules are shallow copies, so `twin.train()`/`.eval()` do not change `model`'s
    mode. Build it after `model.to(...)`: a later move of `model` does not reach the twin."""
    memo = {}

    def twin(module):
        if id(module) in memo:  # a module registered at several places stays shared
            return memo[id(module)]
        if isinstance(module, DTPBlock):
            clone = _PlainBlock(module)
            clone.train(module.training)
        else:
            clone = copy.copy(module)  # shares _parameters and _buffers (the same dicts)
            clone._modules = OrderedDict((name, None if child is None else twin(child))
                                         for name, child in module._modules.items())
        memo[id(module)] = clone
        return clone

    return twin(model)
