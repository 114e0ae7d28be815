"""The training algorithms of `dtp-ext train`, by --algorithm name."""
from .base import Algorithm, FeedbackSettings
from .bp import Backprop
from .drl import DRL
from .ldrl import LDRL
from .reconstruction import TargetProp, VanillaDTP

ALGORITHM_CLASSES = {cls.name: cls for cls in (Backprop, LDRL, VanillaDTP, TargetProp, DRL)}


def make_algorithm(name, model, feedback: FeedbackSettings, input_shape, classes,
                   penultimate_target=None) -> Algorithm:
    """`penultimate_target` (dtp and tp only; None: SPEC's form), see reconstruction.py."""
    if penultimate_target is None:
        return ALGORITHM_CLASSES[name](model, feedback, input_shape, classes)
    return ALGORITHM_CLASSES[name](model, feedback, input_shape, classes,
                                   penultimate_target=penultimate_target)


__all__ = ["Algorithm", "FeedbackSettings", "ALGORITHM_CLASSES", "make_algorithm"]
