"""Every network definition of dtp_ext: the paper's, built from DTP blocks (SimpleVGG, the small
MNIST conv net), and the torchvision architectures the training command converts, adapted to
small images.

torchvision's networks are built with random weights (`weights=None`, nothing is downloaded)
and `num_classes` = the dataset's classes. The stem conv takes the data's channels (1 for
MNIST); for small images (below 64x64: all of MNIST, Fashion-MNIST, CIFAR-10 and ImageNet
32x32) the early downsampling that would shrink them to a few pixels is removed, as the usual
CIFAR variants do: see ADAPTATIONS (also in docs/training.md).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from torch import nn

from .nn import Conv2d, Linear

SIMPLE_VGG_CHANNELS = (128, 128, 256, 256, 512)


def simple_vgg(
    num_classes: int = 10,
    in_channels: int = 3,
    widths: Sequence[int] = SIMPLE_VGG_CHANNELS,
    beta: float = 0.7,
    input_size: int = 32,
) -> nn.Sequential:
    """SimpleVGG (docs/maths.md §1): five conv3x3 (stride 1, padding 1) -> ELU -> maxpool 2x2 blocks
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


def mnist_convnet(
    num_classes: int = 10, in_channels: int = 1, input_size: int = 28, beta: float = 0.7
) -> nn.Sequential:
    """conv5x5 16 ELU pool2, conv5x5 32 ELU pool2, linear: the network of docs/maths.md §14's divergence note."""
    side = ((input_size - 4) // 2 - 4) // 2
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", Conv2d(in_channels, 16, 5, activation="elu", pool=2, beta=beta)),
                ("conv2", Conv2d(16, 32, 5, activation="elu", pool=2, beta=beta)),
                ("flatten", nn.Flatten()),
                ("fc", Linear(32 * side * side, num_classes, beta=beta)),
            ]
        )
    )


SMALL = 64  # inputs below SMALL x SMALL get the small-image adaptations

ADAPTATIONS: dict[str, str] = {
    "resnet18": "stem conv 7x7 stride 2 -> 3x3 stride 1 padding 1 and no max-pool (the CIFAR "
    "ResNet stem); 28x28 and 32x32 inputs then reach the last stage at 4x4",
    "vgg11_bn": "average pool to 1x1 instead of 7x7 and a 512 -> 4096 first classifier layer "
    "(instead of 25088 -> 4096, which would only see 49 copies of a 1x1 map); on "
    "inputs below 32x32 the last max-pool is dropped (28 -> 1x1 after four pools)",
    "mobilenet_v2": "stem conv stride 2 -> 1 (32x32 inputs reach the last stage at 2x2)",
    "squeezenet1_1": "stem conv stride 2 -> 1 with padding 1 (32x32 inputs reach the "
    "classifier at 3x3 instead of 1x1)",
    "resnet-small": "none needed: built for small images (3x3 stem, stride 1, no max-pool)",
}


def _torchvision():
    try:
        import torchvision
    except ImportError:
        raise ImportError(
            "the torchvision models (" + "|".join(sorted(ADAPTATIONS)) + ") need "
            "torchvision, an optional extra: pip install torchvision (or "
            "pip install 'dtp_ext[vision]')"
        ) from None
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
        model.features[0][0] = _kaiming_conv(
            nn.Conv2d(channels, stem.out_channels, 3, 1 if size < SMALL else 2, 1, bias=False)
        )
    return model


def _squeezenet1_1(tv, channels: int, size: int, classes: int) -> nn.Module:
    model = tv.models.squeezenet1_1(weights=None, num_classes=classes)
    if size < SMALL:
        model.features[0] = _kaiming_conv(nn.Conv2d(channels, 64, 3, 1, 1), uniform=True)
    elif channels != 3:
        model.features[0] = _kaiming_conv(nn.Conv2d(channels, 64, 3, 2), uniform=True)
    return model


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet-14 of torchvision's BasicBlock: 3x3 stem conv (16) + BatchNorm +
    ReLU, three stages of two BasicBlocks 16, 32 and 64 wide (stride 2 and a 1x1 conv + BN
    shortcut at the start of stages 2 and 3), global average pool, Linear. 16 DTP blocks
    once converted; about 25x fewer multiply-adds than resnet18's CIFAR variant."""

    def __init__(
        self, tv, channels: int, classes: int, widths=(16, 32, 64), blocks_per_stage: int = 2
    ):
        super().__init__()
        from torchvision.models.resnet import BasicBlock, conv1x1

        self.conv1 = _kaiming_conv(nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False))
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, width_in = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or width_in != width:
                downsample = nn.Sequential(
                    _kaiming_conv(conv1x1(width_in, width, stride)), nn.BatchNorm2d(width)
                )
            layers = [BasicBlock(width_in, width, stride, downsample)]
            layers += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*layers))
            width_in = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width_in, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _kaiming_conv(m)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _resnet_small(tv, channels: int, size: int, classes: int) -> nn.Module:
    return SmallResNet(tv, channels, classes)


BUILDERS: dict[str, Callable] = {
    "resnet18": _resnet18,
    "vgg11_bn": _vgg11_bn,
    "mobilenet_v2": _mobilenet_v2,
    "squeezenet1_1": _squeezenet1_1,
    "resnet-small": _resnet_small,
}


def torchvision_model(name: str, channels: int, size: int, classes: int) -> nn.Module:
    """torchvision's `name` (random weights, nothing downloaded), adapted to (channels, size)
    (ADAPTATIONS), as plain torch.nn modules: dtp_ext.convert makes its DTP blocks."""
    return BUILDERS[name](_torchvision(), channels, size, classes)
