"""Block configurations the kernel tests sweep, and blocks built for one case each."""

import torch

import dtp_ext

# Block configurations the kernel tests sweep: (name, constructor, input shape).
BLOCKS = {
    "linear": (lambda: dtp_ext.Linear(7, 5), (6, 7)),
    "linear-tanh": (lambda: dtp_ext.Linear(7, 5, activation="tanh"), (6, 7)),
    "linear-relu": (lambda: dtp_ext.Linear(7, 5, activation="relu"), (6, 7)),
    "linear-elu-nobias": (lambda: dtp_ext.Linear(7, 5, bias=False, activation="elu"), (6, 7)),
    "conv-elu-pool2": (
        lambda: dtp_ext.Conv2d(3, 4, 3, padding=1, activation="elu", pool=2),
        (5, 3, 8, 8),
    ),
    "conv-relu-pool2-odd": (
        lambda: dtp_ext.Conv2d(2, 3, 3, padding=1, activation="relu", pool=2),
        (4, 2, 7, 9),
    ),
    "conv-stride2-tanh": (
        lambda: dtp_ext.Conv2d(3, 4, 3, stride=2, padding=1, activation="tanh"),
        (3, 3, 9, 8),
    ),
    "conv-groups-dilation": (
        lambda: dtp_ext.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, activation="elu"),
        (3, 4, 6, 6),
    ),
    "conv-pool3-nobias": (
        lambda: dtp_ext.Conv2d(2, 3, 5, padding=2, bias=False, activation="elu", pool=3),
        (2, 2, 9, 9),
    ),
    "conv-linear": (lambda: dtp_ext.Conv2d(3, 4, 1), (3, 3, 5, 5)),
    # >= 128 output positions: the channels-last convolution path
    "conv-elu-pool2-large": (
        lambda: dtp_ext.Conv2d(3, 4, 3, padding=1, activation="elu", pool=2),
        (3, 3, 16, 16),
    ),
    # <= 4 output positions: the im2col + GEMM weight-gradient path; every output position
    # reads the whole input, so the loops' noisy passes are one GEMM with the unrolled weight
    "conv-small-map": (
        lambda: dtp_ext.Conv2d(3, 4, 3, padding=1, activation="elu", pool=2),
        (5, 3, 2, 2),
    ),
    # the unrolled-weight GEMM without bias on a 1x1 map, and with a non-square kernel
    "conv-1x1-map-nobias": (
        lambda: dtp_ext.Conv2d(3, 4, 3, padding=1, bias=False, activation="tanh"),
        (4, 3, 1, 1),
    ),
    "conv-small-map-wide-kernel": (
        lambda: dtp_ext.Conv2d(3, 5, (3, 5), padding=(1, 2), activation="relu"),
        (3, 3, 2, 3),
    ),
    # the small-map weight-gradient GEMM with stride and dilation (no unrolled weight)
    "conv-small-map-stride2-dilation2": (
        lambda: dtp_ext.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2, activation="elu"),
        (3, 3, 3, 3),
    ),
}


def make_block(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    ctor, shape = BLOCKS[name]
    block = ctor().to(dtype)
    x = torch.randn(shape, dtype=dtype)
    return block, x


def output_shape(block, x):
    with torch.no_grad():
        return dtp_ext.reference.forward_block(block, dtp_ext.reference.block_input(block, x))[
            0
        ].shape


def pooled_block():
    torch.manual_seed(0)
    b = dtp_ext.Conv2d(3, 4, 3, padding=1, activation="relu", pool=2)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out, idx = b.forward_with_indices(x)
    return b, x, out, idx


def saturated_block(kind):
    torch.manual_seed(0)
    if kind == "elu-bias-60":  # ELU(z) = -1.0 exactly for z < -38: every window ties
        b = dtp_ext.Conv2d(2, 3, 3, padding=1, activation="elu", pool=2).double()
        with torch.no_grad():
            b.bias.fill_(-60.0)
    else:  # tanh with large weights: +-1.0 exactly in most positions
        b = dtp_ext.Conv2d(2, 3, 3, padding=1, activation="tanh", pool=2).double()
        with torch.no_grad():
            b.weight.mul_(200.0)
    return b, torch.randn(4, 2, 8, 8, dtype=torch.float64)
