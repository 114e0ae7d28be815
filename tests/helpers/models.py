"""Small models and model comparisons shared by several test subjects."""

import torch
import torch.nn.functional as F
from torch import nn

import dtp_ext


def plain_leaves(original, converted, report):
    """Names of the converted model's leaf modules that are neither DTP blocks nor the
    nn.Identity placeholders left where modules were folded into a block."""
    before = dict(original.named_modules(remove_duplicate=False))
    leaves = {
        n: m
        for n, m in converted.named_modules(remove_duplicate=False)
        if n and not list(m.children()) and not isinstance(m, dtp_ext.DTPBlock)
    }
    placeholders = {
        n
        for n, m in leaves.items()
        if type(m) is torch.nn.Identity and type(before[n]) is not torch.nn.Identity
    }
    assert len(placeholders) == sum(len(folded) for _, _, folded in report.converted)
    return set(leaves) - placeholders


class HeadFirst(nn.Module):
    """Registers its head before its body, uses it last."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 10)
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )

    def forward(self, x):
        return self.head(self.body(x))


def dtp_and_bp_grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    dtp = [p.grad.clone() for p in model.parameters()]
    blocks = [m for _, m in dtp_ext.dtp_blocks(model)]
    bp_model = nn.Sequential(*[_as_plain(m) for m in model]).double()
    bp_model.zero_grad()
    F.cross_entropy(bp_model(x), y).backward()
    return dtp, [p.grad.clone() for p in bp_model.parameters()], blocks


def _as_plain(m):
    """The same block built from torch.nn modules, for backprop."""
    if not isinstance(m, dtp_ext.DTPBlock):
        return m
    op = (
        nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        if isinstance(m, dtp_ext.Linear)
        else nn.Conv2d(
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            m.groups,
            m.bias is not None,
        )
    )
    op = op.double()
    op.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("feedback")})
    acts = {None: nn.Identity(), "relu": nn.ReLU(), "elu": nn.ELU(), "tanh": nn.Tanh()}
    return nn.Sequential(op, acts[m.activation], nn.MaxPool2d(m.pool) if m.pool else nn.Identity())
