"""Block-by-block evaluation of a chain model (nn.Sequential of DTP blocks joined by Flatten).

The baselines that do not use the fused DTP backward (BP through the same weights, TP, DRL) and
the probe metrics need the network as explicit blocks: each block's detached input, its output
with a graph to its own weights only, and its pool indices. Everything here uses
dtp_ext.block_math's pure-PyTorch ops, so it never overwrites the inputs the DTP blocks recorded
for FeedbackTrainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from dtp_ext.nn import DTPBlock
from dtp_ext.block_math import block_input, feedback_block, forward_block

_RESHAPES = (nn.Flatten, nn.Identity)


@dataclass
class BlockRecord:
    block: DTPBlock
    position: int                 # index of the block in the Sequential
    input: torch.Tensor           # detached, in the block's op layout
    output: torch.Tensor          # graph to this block's weights only
    indices: Optional[torch.Tensor]
    pre_pool_shape: torch.Size


def chain_modules(model: nn.Module) -> List[nn.Module]:
    if not isinstance(model, nn.Sequential):
        raise TypeError("this algorithm needs an nn.Sequential of dtp_ext blocks joined by Flatten")
    modules = list(model)
    for m in modules:
        if not isinstance(m, DTPBlock) and not isinstance(m, _RESHAPES):
            raise TypeError(f"this algorithm needs DTP blocks joined only by Flatten/Identity, found {type(m).__name__}")
    return modules


def forward_bp(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output with an ordinary autograd graph: backprop through the same weights."""
    for m in chain_modules(model):
        x = forward_block(m, block_input(m, x))[0] if isinstance(m, DTPBlock) else m(x)
    return x


def forward_records(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, List[BlockRecord]]:
    """Output and per-block records, each block's input detached (layer-local losses)."""
    records = []
    for position, m in enumerate(chain_modules(model)):
        if isinstance(m, DTPBlock):
            inp = block_input(m, x).detach()
            out, indices, pre = forward_block(m, inp)
            records.append(BlockRecord(m, position, inp, out, indices, pre))
            x = out
        else:
            x = m(x)
    return x, records


@torch.no_grad()
def forward_from(model: nn.Module, position: int, x: torch.Tensor) -> torch.Tensor:
    """Runs the modules after `position` on x (no graph): the rest of the network."""
    for m in chain_modules(model)[position + 1:]:
        x = forward_block(m, block_input(m, x))[0] if isinstance(m, DTPBlock) else m(x)
    return x


def feedback(record: BlockRecord, y: torch.Tensor) -> torch.Tensor:
    """G(y) of the record's block with its current feedback weights, clean pool indices."""
    return feedback_block(record.block, y, record.indices, record.pre_pool_shape, record.input.shape)


def first_target(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """t_N = s_N - beta * grad of the sum-reduced cross-entropy (SPEC §3, paper form)."""
    with torch.enable_grad():
        s = logits.detach().requires_grad_(True)
        grad = torch.autograd.grad(nn.functional.cross_entropy(s, labels, reduction="sum"), s)[0]
    return (s - beta * grad).detach()


def layer_loss_gradients(records: List[BlockRecord], targets: List[torch.Tensor], beta: float,
                         *, accumulate: bool) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Gradients of sum_n 1/2 mean_b |s_n - t_n|^2, divided by beta (this library's units).
    With `accumulate`, they are also added to the parameters' .grad for the optimizer."""
    loss = sum(0.5 * ((r.output - t.reshape(r.output.shape)) ** 2).flatten(1).sum(1).mean()
               for r, t in zip(records, targets))
    params = []
    for r in records:
        params += [r.block.weight] + ([r.block.bias] if r.block.bias is not None else [])
    grads = [g / beta for g in torch.autograd.grad(loss, params)]
    result, i = [], 0
    for r in records:
        has_bias = r.block.bias is not None
        result.append((grads[i], grads[i + 1] if has_bias else None))
        i += 2 if has_bias else 1
    if accumulate:
        for p, g in zip(params, grads):
            p.grad = g.clone() if p.grad is None else p.grad + g
    return result
