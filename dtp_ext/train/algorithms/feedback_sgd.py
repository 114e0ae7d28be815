"""SGD with momentum on tensors that are not nn.Parameters (feedback buffers, DRL's Q).

Same update as torch.optim.SGD without weight decay (dampening 0, no Nesterov): buf = m*buf + g,
p -= lr*buf; its state is a plain dict of named buffers, saved in checkpoints.
"""

from __future__ import annotations

import torch


class MomentumSGD:
    def __init__(self, momentum: float = 0.9):
        self.momentum = momentum
        self.buffers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, name: str, param: torch.Tensor, grad: torch.Tensor, lr: float):
        buf = self.buffers.get(name)
        if buf is None:
            buf = self.buffers[name] = grad.clone()  # torch.optim.SGD's first step
        else:
            buf.mul_(self.momentum).add_(grad)
        param.sub_(lr * buf)

    def state_dict(self) -> dict:
        return {k: v.clone() for k, v in self.buffers.items()}

    def load_state_dict(self, state: dict, device=None):
        self.buffers = {
            k: v.to(device).clone() if device is not None else v.clone() for k, v in state.items()
        }
