"""dtp_ext: difference target propagation with learned backprop targets (L-DRL) for PyTorch.

Fused C++ (and CUDA) kernels behind drop-in layers:

    model = dtp_ext.convert(model, beta=0.7)           # or build it from dtp_ext layers
    trainer = dtp_ext.FeedbackTrainer(model)            # settings planned per block
    out = model(x); trainer.step()                      # L-DRL feedback phase on this batch
    loss = F.cross_entropy(out, y); loss.backward(); opt.step()
"""

from . import (  # noqa: F401
    alignment,
    functional,
    hardware,
    metrics,
    ops,  # noqa: F401  (loads the compiled kernels; fails loudly if missing)
    reference,
)
from .build import build_info
from .convert import ConversionReport, convert
from .loss_scaling import current_loss_scale, loss_scale
from .nn import Conv2d, DTPBlock, Linear, dtp_blocks
from .ops import NonFiniteInputError
from .tensorboard import log_feedback_report
from .trainer import FeedbackReport, FeedbackTrainer

__version__ = "0.1.0"

__all__ = [
    "Linear",
    "Conv2d",
    "DTPBlock",
    "convert",
    "ConversionReport",
    "FeedbackTrainer",
    "FeedbackReport",
    "NonFiniteInputError",
    "log_feedback_report",
    "build_info",
    "loss_scale",
    "current_loss_scale",
    "dtp_blocks",
    "alignment",
    "functional",
    "hardware",
    "metrics",
    "reference",
]
