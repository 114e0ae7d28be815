"""The training algorithms of `dtp-ext train`, by --algorithm name."""

from .base import Algorithm, FeedbackSettings
from .bp import Backprop
from .drl import DRL
from .ldrl import LDRL
from .reconstruction import TargetProp, VanillaDTP

ALGORITHM_CLASSES = {cls.name: cls for cls in (Backprop, LDRL, VanillaDTP, TargetProp, DRL)}


def make_algorithm(
    name, model, feedback: FeedbackSettings, input_shape, classes, **options
) -> Algorithm:
    """`options` left at None take the algorithm's default: `penultimate_target` (dtp, tp;
    reconstruction.py), `variant` (drl: "p" or "s"; drl.py)."""
    options = {k: v for k, v in options.items() if v is not None}
    return ALGORITHM_CLASSES[name](model, feedback, input_shape, classes, **options)


__all__ = ["Algorithm", "FeedbackSettings", "ALGORITHM_CLASSES", "make_algorithm"]
