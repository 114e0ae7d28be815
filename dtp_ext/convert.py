"""dtp_ext.convert: swap a model's nn.Linear / nn.Conv2d for DTP blocks."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List, Tuple

from torch import nn

from .nn import Conv2d, DTPBlock, Linear

_FOLDABLE_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.ELU: "elu"}


@dataclass
class ConversionReport:
    converted: List[Tuple[str, str, List[str]]] = field(default_factory=list)  # name, type, folded
    left: List[Tuple[str, str, str]] = field(default_factory=list)  # name, type, why

    def __str__(self):
        lines = [f"dtp_ext.convert: {len(self.converted)} block(s) converted"]
        for name, kind, folded in self.converted:
            extra = f" (+ {', '.join(folded)} folded in)" if folded else ""
            lines.append(f"  {name}: {kind} -> dtp_ext.{kind}{extra}")
        if self.left:
            lines.append(f"  left as plain modules: {len(self.left)}")
            for name, kind, why in self.left:
                lines.append(f"  {name}: {kind} ({why})")
        return "\n".join(lines)


def _activation_name(module):
    for cls, name in _FOLDABLE_ACTIVATIONS.items():
        if type(module) is cls:
            if cls is nn.ELU and module.alpha != 1.0:
                return None  # the kernels implement ELU with alpha = 1, as in the paper
            return name
    return None


def _pool_size(module):
    """k for a MaxPool2d with kernel = stride = k, no padding/dilation/ceil mode; else None."""
    if type(module) is not nn.MaxPool2d or module.return_indices or module.ceil_mode:
        return None
    def single(v):
        if isinstance(v, (tuple, list)):
            return v[0] if len(set(v)) == 1 else None
        return v
    k, s = single(module.kernel_size), single(module.stride)
    if k is None or k != s or single(module.padding) != 0 or single(module.dilation) != 1:
        return None
    return k


def _convert_leaf(module, beta):
    """(dtp block, None) or (None, reason it stays as it is)."""
    if type(module) is nn.Linear:
        block = Linear(module.in_features, module.out_features, module.bias is not None,
                       device=module.weight.device, dtype=module.weight.dtype, beta=beta)
    elif type(module) is nn.Conv2d:
        if module.padding_mode != "zeros":
            return None, f"padding_mode={module.padding_mode!r}: only 'zeros' has an adjoint feedback"
        try:
            block = Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                           module.stride, module.padding, module.dilation, module.groups,
                           module.bias is not None, device=module.weight.device,
                           dtype=module.weight.dtype, beta=beta)
        except ValueError as err:
            return None, str(err)
    else:
        return None, None
    block.weight = module.weight
    if module.bias is not None:
        block.bias = module.bias
    block.train(module.training)
    return block, None


def _convert_children(parent, prefix, beta, fold, report):
    names = list(parent._modules)
    sequential = isinstance(parent, nn.Sequential)
    i = 0
    while i < len(names):
        name = names[i]
        child = parent._modules[name]
        full = f"{prefix}{name}"
        block, why = _convert_leaf(child, beta) if child is not None else (None, None)
        if block is None:
            if why:
                report.left.append((full, type(child).__name__, why))
            elif child is not None and not isinstance(child, DTPBlock):
                if list(child.children()):
                    _convert_children(child, full + ".", beta, fold, report)
                elif any(True for _ in child.parameters(recurse=False)):
                    report.left.append((full, type(child).__name__, "no DTP counterpart"))
            i += 1
            continue
        parent._modules[name] = block
        folded = []
        # Inside a Sequential, a directly following activation (and, after a conv, a max-pool
        # with kernel = stride) become part of the block, so its feedback path includes them.
        if fold and sequential and i + 1 < len(names):
            act = _activation_name(parent._modules[names[i + 1]])
            if act is not None:
                block.activation = act
                folded.append(type(parent._modules[names[i + 1]]).__name__)
                parent._modules[names[i + 1]] = nn.Identity()
                i += 1
                if isinstance(block, Conv2d) and i + 1 < len(names):
                    k = _pool_size(parent._modules[names[i + 1]])
                    if k is not None:
                        block.pool = k
                        folded.append(f"MaxPool2d({k})")
                        parent._modules[names[i + 1]] = nn.Identity()
                        i += 1
        report.converted.append((full, type(child).__name__, folded))
        i += 1


def convert(model: nn.Module, *, beta: float = 0.7, fold: bool = True, inplace: bool = False,
            verbose: bool = False, return_report: bool = False):
    """Return `model` with every nn.Linear / nn.Conv2d replaced by its DTP block.

    Forward weights are kept (the same values, so outputs are unchanged); feedback weights are
    drawn fresh with PyTorch's default init. Inside nn.Sequential containers a directly
    following ReLU/ELU(alpha=1)/Tanh and, after a conv, a MaxPool2d with kernel = stride are
    folded into the block (replaced by nn.Identity) so that its feedback block includes them,
    as in the paper. Modules with parameters and no DTP counterpart (e.g. BatchNorm) stay as
    they are: gradients pass through them as through any module (SPEC §3).

    With `inplace=False` (default) the model is deep-copied first. `verbose` prints the
    conversion report; `return_report=True` returns (model, ConversionReport).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    block, why = _convert_leaf(model, beta)
    if block is not None:
        model = block
        report.converted.append(("", type(model).__name__, []))
    else:
        _convert_children(model, "", beta, fold, report)
    if verbose:
        print(report)
    return (model, report) if return_report else model
