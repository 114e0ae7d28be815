"""A chain model (nn.Sequential of DTP blocks joined by Flatten) evaluated block by block.

The baselines that build explicit targets (TP, DRL, DTP's gradient form) and the probe metrics
need the network as explicit blocks: each block's detached input, its output with a graph to
its own weights only, and its pool indices (dtp_ext.reference.forward_records). Everything here
runs the blocks' forward as plain torch ops, so it never overwrites the inputs the DTP blocks
recorded for FeedbackTrainer.
"""

from __future__ import annotations

import torch
from torch import nn

from dtp_ext import reference
from dtp_ext.nn import DTPBlock
from dtp_ext.reference import BlockRecord, block_input, forward_block

_RESHAPES = (nn.Flatten, nn.Identity)


def chain_modules(model: nn.Module) -> list[nn.Module]:
    if not isinstance(model, nn.Sequential):
        raise TypeError("this algorithm needs an nn.Sequential of dtp_ext blocks joined by Flatten")
    modules = list(model)
    for m in modules:
        if not isinstance(m, DTPBlock) and not isinstance(m, _RESHAPES):
            raise TypeError(
                f"this algorithm needs DTP blocks joined only by Flatten/Identity, found {type(m).__name__}"
            )
    return modules


def forward_records(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[BlockRecord]]:
    """Output and per-block records, each block's input detached (layer-local losses)."""
    return reference.forward_records(chain_modules(model), x)


@torch.no_grad()
def forward_from(model: nn.Module, position: int, x: torch.Tensor) -> torch.Tensor:
    """Runs the modules after `position` on x (no graph): the rest of the network."""
    for m in chain_modules(model)[position + 1 :]:
        x = forward_block(m, block_input(m, x))[0] if isinstance(m, DTPBlock) else m(x)
    return x
