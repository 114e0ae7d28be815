"""dtp_ext.convert: swap a model's nn.Linear / nn.Conv2d for DTP blocks."""

from __future__ import annotations

import copy
import hashlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .functional import activation_name
from .nn import Conv2d, DTPBlock, Linear


@dataclass
class ConversionReport:
    """What `convert` did: the blocks it made (with what it folded into them) and every leaf
    module it left as a plain torch module, each with the reason. Difference targets pass
    through plain modules as a gradient would (docs/maths.md §3); functional calls inside a module's
    forward() (torch.flatten, F.relu, residual `+`) are not modules and are not listed."""

    converted: list[tuple[str, str, list[str]]] = field(default_factory=list)  # name, type, folded
    left: list[tuple[str, str, str]] = field(default_factory=list)  # name, type, why

    def left_counts(self) -> dict[str, int]:
        """How many modules of each type stayed plain, most frequent first."""
        counts = Counter(kind for _, kind, _ in self.left)
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    def __str__(self):
        lines = [f"dtp_ext.convert: {len(self.converted)} block(s) converted"]
        for name, kind, folded in self.converted:
            extra = f" (+ {', '.join(folded)} folded in)" if folded else ""
            lines.append(f"  {name}: {kind} -> dtp_ext.{kind}{extra}")
        if self.left:
            counts = ", ".join(f"{kind} {n}" for kind, n in self.left_counts().items())
            lines.append(
                f"  left as plain modules: {len(self.left)} ({counts}); difference "
                "targets pass through them as a gradient"
            )
            for name, kind, why in self.left:
                lines.append(f"  {name}: {kind} ({why})")
        lines.append(
            "  activations and pools applied as functions in forward() (F.relu, "
            "F.max_pool2d, ...) are not modules: they stay outside the blocks, and the "
            "difference target passes them as a gradient would"
        )
        return "\n".join(lines)


def _activation_name(module):
    """The block activation `module` folds into, if any."""
    if type(module) is nn.ELU and module.alpha != 1.0:
        return None  # the kernels implement ELU with alpha = 1, as in the paper
    return activation_name(module)


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


def _default_generator(name: str, module: nn.Module) -> torch.Generator:
    """The generator a block's feedback weights are drawn from when convert is given none:
    seeded from torch.initial_seed() (what torch.manual_seed set; reading it draws nothing)
    mixed with the block's qualified name, type and weight shape, so a seeded script converts
    to the same feedback weights every run without touching the global random stream."""
    key = f"dtp_ext.convert:{torch.initial_seed()}:{name}:{type(module).__name__}:"
    key += str(tuple(module.weight.shape))
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)


def _convert_leaf(module, beta, name="", generator=None):
    """(dtp block, None) or (None, reason it stays as it is). The block is built on the meta
    device (its constructor's init draws nothing), takes `module`'s own weight and bias, and
    draws its feedback weights from `generator` (None: the block's default generator)."""
    if type(module) is nn.Linear:
        block = Linear(
            module.in_features,
            module.out_features,
            module.bias is not None,
            device="meta",
            dtype=module.weight.dtype,
            beta=beta,
        )
    elif type(module) is nn.Conv2d:
        if module.padding_mode != "zeros":
            return (
                None,
                f"padding_mode={module.padding_mode!r}: only 'zeros' has an adjoint feedback",
            )
        try:
            block = Conv2d(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
                module.bias is not None,
                device="meta",
                dtype=module.weight.dtype,
                beta=beta,
            )
        except ValueError as err:
            return None, str(err)
    else:
        return None, None
    block.to_empty(device=module.weight.device)
    block.weight = module.weight
    if module.bias is not None:
        block.bias = module.bias
    block.reset_feedback_parameters(
        _default_generator(name, module) if generator is None else generator
    )
    block.train(module.training)
    return block, None


def _describe_pool(module) -> str:
    """MaxPool2d's settings, the ones that prevent folding included."""
    parts = [f"kernel_size={module.kernel_size}", f"stride={module.stride}"]
    for key, default in (
        ("padding", 0),
        ("dilation", 1),
        ("ceil_mode", False),
        ("return_indices", False),
    ):
        if getattr(module, key) not in (default, (default, default)):
            parts.append(f"{key}={getattr(module, key)}")
    return ", ".join(parts)


_FOLD_RULE = "only a ReLU/ELU(alpha=1)/Tanh directly after a converted Linear/Conv2d in an nn.Sequential is folded"


def _plain_reason(module, parent, previous: nn.Module | None, fold: bool = True) -> str:
    """Why a leaf module with no conversion of its own stays a plain module. `previous`: the
    sibling before it in an nn.Sequential as it was before conversion, None when it is the
    first or its parent is not an nn.Sequential."""
    sequential = isinstance(parent, nn.Sequential)
    where = (
        (
            f"its parent {type(parent).__name__} is not an nn.Sequential, so convert cannot "
            "see what it is applied to (forward() decides)"
        )
        if not sequential
        else (
            f"it follows {type(previous).__name__}"
            if previous is not None
            else "it is the first module of its nn.Sequential"
        )
    )
    if not fold:
        where = (
            "convert folds only with fold=True (unfolded, the target passes it as a gradient "
            "would; docs/maths.md §9)"
        )
    if parent is None:
        where = "it is the whole model"
    if _activation_name(module) is not None:
        return f"not folded: {where}; {_FOLD_RULE}"
    if isinstance(module, nn.ELU):
        return f"ELU alpha={module.alpha}: the kernels implement alpha=1 only"
    if type(module) is nn.MaxPool2d:
        if _pool_size(module) is None:
            return (
                f"not folded: {_describe_pool(module)}; only kernel = stride without padding, "
                "dilation, ceil_mode or return_indices has a MaxUnpool feedback"
            )
        return (
            f"not folded: {where}; a max-pool is folded only after a converted Conv2d and its "
            "folded activation in an nn.Sequential"
        )
    if isinstance(
        module,
        (
            nn.ReLU6,
            nn.LeakyReLU,
            nn.PReLU,
            nn.GELU,
            nn.SiLU,
            nn.Hardswish,
            nn.Hardsigmoid,
            nn.Sigmoid,
            nn.Softplus,
            nn.Mish,
            nn.SELU,
            nn.CELU,
            nn.Hardtanh,
        ),
    ):
        return "activation without a DTP counterpart (the blocks fold ReLU, ELU(alpha=1), Tanh)"
    if isinstance(module, (nn.Flatten, nn.Unflatten)):
        return "reshape"
    if isinstance(module, nn.modules.pooling._MaxPoolNd) or isinstance(
        module,
        (
            nn.modules.pooling._AdaptiveMaxPoolNd,
            nn.modules.pooling._AvgPoolNd,
            nn.modules.pooling._AdaptiveAvgPoolNd,
        ),
    ):
        return "pooling without a DTP counterpart (only MaxPool2d with kernel = stride folds)"
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return "no DTP counterpart (parameter-free)"
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return (
            f"a subclass ({type(module).__qualname__}), not torch.nn.{type(module).__name__} itself"
        )
    if any(True for _ in module.parameters(recurse=False)):
        return "no DTP counterpart"
    return "no DTP counterpart (parameter-free)"


def _convert_children(parent, prefix, beta, fold, report, placeholders, generator):
    names = list(parent._modules)
    sequential = isinstance(parent, nn.Sequential)
    previous = None  # the sibling before, as it was before conversion (in a Sequential)
    i = 0
    while i < len(names):
        name = names[i]
        child = parent._modules[name]
        full = f"{prefix}{name}"
        block, why = (
            _convert_leaf(child, beta, full, generator) if child is not None else (None, None)
        )
        if block is None:
            if why:
                report.left.append((full, type(child).__name__, why))
            elif (
                child is not None
                and not isinstance(child, DTPBlock)
                and id(child) not in placeholders
            ):
                if list(child.children()):
                    if any(True for _ in child.parameters(recurse=False)):
                        report.left.append(
                            (
                                full,
                                type(child).__name__,
                                "its own parameters (not "
                                "those of its children) have no DTP counterpart",
                            )
                        )
                    _convert_children(
                        child, full + ".", beta, fold, report, placeholders, generator
                    )
                else:
                    report.left.append(
                        (
                            full,
                            type(child).__name__,
                            _plain_reason(child, parent, previous if sequential else None, fold),
                        )
                    )
            previous = child
            i += 1
            continue
        parent._modules[name] = block
        folded = []
        previous = child
        # Inside a Sequential, a directly following activation (and, after a conv, a max-pool
        # with kernel = stride) become part of the block, so its feedback path includes them.
        if fold and sequential and i + 1 < len(names):
            act = _activation_name(parent._modules[names[i + 1]])
            if act is not None:
                block.activation = act
                previous = parent._modules[names[i + 1]]
                folded.append(type(previous).__name__)
                parent._modules[names[i + 1]] = _placeholder(placeholders)
                i += 1
                if isinstance(block, Conv2d) and i + 1 < len(names):
                    k = _pool_size(parent._modules[names[i + 1]])
                    if k is not None:
                        block.pool = k
                        folded.append(f"MaxPool2d({k})")
                        previous = parent._modules[names[i + 1]]
                        parent._modules[names[i + 1]] = _placeholder(placeholders)
                        i += 1
        report.converted.append((full, type(child).__name__, folded))
        i += 1


def _placeholder(placeholders: set) -> nn.Identity:
    """The nn.Identity a folded module leaves behind (not reported as a plain module)."""
    identity = nn.Identity()
    placeholders.add(id(identity))
    return identity


def convert(
    model: nn.Module,
    *,
    beta: float = 0.7,
    fold: bool = False,
    inplace: bool = False,
    verbose: bool = False,
    return_report: bool = False,
    generator: torch.Generator | None = None,
):
    """Return `model` with every nn.Linear / nn.Conv2d replaced by its DTP block.

    Forward weights are kept (the same values, so outputs are unchanged); feedback weights are
    drawn fresh with PyTorch's default init, the distribution of a new dtp_ext.Linear/Conv2d's
    (see "Random numbers" below). Every other leaf module stays as it is and is listed in the
    report with the reason; difference targets pass through plain modules as a gradient passes
    through any module (docs/maths.md §3), and so do activations applied as functions in
    forward() (F.relu), which are not modules.

    `fold=True` folds, inside nn.Sequential containers, a directly following
    ReLU/ELU(alpha=1)/Tanh and, after a conv, a MaxPool2d with kernel = stride into the block
    (replaced by nn.Identity) so that its feedback block includes them, as in the paper. Off
    by default: a folded ReLU's difference relu(s) - relu(s - step) passes the target at dead
    units, where backprop passes nothing, so even a perfect feedback weight is tens of degrees
    from backprop (docs/maths.md §9); unfolded, a perfect feedback weight gives backprop's
    updates and the floor formula applies exactly.

    Random numbers: converting leaves torch's global random stream alone (a seeded script draws
    the same dropout masks, noise and data order with or without convert). The feedback
    weights come from `generator`, a torch.Generator drawn from block after block in the
    report's order, or by default from one generator per block seeded from
    torch.initial_seed() (what torch.manual_seed set) and the block's qualified name, type
    and weight shape: the same seed converts to the same feedback weights. Two models
    converted in one script then start with equal feedback weights in blocks of the same name
    and shape; pass a generator to draw them apart.

    With `inplace=False` (default) the model is deep-copied first. `verbose` prints the
    conversion report; `return_report=True` returns (model, ConversionReport).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"convert: generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    block, why = _convert_leaf(model, beta, "", generator)
    if block is not None:
        model = block
        report.converted.append(("", type(model).__name__, []))
    elif why:
        report.left.append(("", type(model).__name__, why))
    elif list(model.children()):
        _convert_children(model, "", beta, fold, report, set(), generator)
    elif not isinstance(model, DTPBlock):
        report.left.append(("", type(model).__name__, _plain_reason(model, None, None, fold)))
    if verbose:
        print(report)
    return (model, report) if return_report else model
