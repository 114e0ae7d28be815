"""dtp_ext.convert's report: every module left plain is listed, with the reason."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

import dtp_ext
from tests.helpers.models import plain_leaves


class Residual(nn.Module):
    """A module whose forward() applies its children: convert cannot see the order."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x) + x)


def model():
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(3, 4, 3, padding=1)),
                ("bn1", nn.BatchNorm2d(4)),
                ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(2)),  # after a BatchNorm
                ("conv2", nn.Conv2d(4, 4, 3, padding=1)),
                ("act2", nn.ReLU()),
                ("pool2", nn.MaxPool2d(3, 2, 1)),  # kernel != stride
                ("block", Residual()),
                ("conv3", nn.Conv2d(4, 4, 1)),
                ("act3", nn.ReLU6()),
                ("conv4", nn.Conv2d(4, 4, 1)),
                ("act4", nn.ELU(alpha=0.5)),
                ("gap", nn.AdaptiveAvgPool2d(1)),
                ("flat", nn.Flatten()),
                ("drop", nn.Dropout(0.2)),
                ("fc", nn.Linear(4, 3)),
                ("relu_fc", nn.ReLU()),
                ("relu_again", nn.ReLU()),
            ]
        )
    )


def test_report_lists_every_plain_module_with_its_reason():
    original = model()
    converted, report = dtp_ext.convert(original, fold=True, return_report=True)
    left = {name: (kind, why) for name, kind, why in report.left}
    assert set(left) == plain_leaves(original, converted, report)
    assert left["bn1"] == ("BatchNorm2d", "no DTP counterpart")
    assert "follows BatchNorm2d" in left["relu1"][1]
    assert "follows ReLU" in left["pool1"][1] and "after a converted Conv2d" in left["pool1"][1]
    assert "kernel_size=3, stride=2, padding=1" in left["pool2"][1]
    assert "Residual is not an nn.Sequential" in left["block.relu"][1]
    assert "without a DTP counterpart" in left["act3"][1] and left["act3"][0] == "ReLU6"
    assert "alpha=0.5" in left["act4"][1]
    assert left["gap"][0] == "AdaptiveAvgPool2d" and "pooling" in left["gap"][1]
    assert left["flat"] == ("Flatten", "reshape")
    assert left["drop"][0] == "Dropout"
    assert "follows ReLU" in left["relu_again"][1]
    # What was folded is not listed as plain: act2 into conv2, relu_fc into fc.
    assert "act2" not in left and "relu_fc" not in left
    converted_names = {name: folded for name, _, folded in report.converted}
    assert converted_names == {
        "conv1": [],
        "conv2": ["ReLU"],
        "block.conv": [],
        "conv3": [],
        "conv4": [],
        "fc": ["ReLU"],
    }
    assert report.left_counts() == {
        "ReLU": 3,
        "MaxPool2d": 2,
        "AdaptiveAvgPool2d": 1,
        "BatchNorm2d": 1,
        "Dropout": 1,
        "ELU": 1,
        "Flatten": 1,
        "ReLU6": 1,
    }
    text = str(report)
    assert "left as plain modules: 11 (ReLU 3, MaxPool2d 2," in text
    assert all(f"  {name}: {kind} ({why})" in text for name, kind, why in report.left)


def test_outputs_unchanged_with_the_plain_modules():
    torch.manual_seed(0)
    original = model().eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(dtp_ext.convert(original).eval()(x), original(x))


@pytest.mark.parametrize("kwargs", [{}, {"fold": False}])
def test_unfolded_by_default_and_says_how_to_fold(kwargs):
    converted, report = dtp_ext.convert(
        nn.Sequential(nn.Linear(3, 3), nn.ReLU()), return_report=True, **kwargs
    )
    assert report.left == [("1", "ReLU", report.left[0][2])]
    assert "folds only with fold=True" in report.left[0][2]
    assert converted[0].activation is None and type(converted[1]) is nn.ReLU


def test_report_says_functional_activations_stay_outside_the_blocks():
    _, report = dtp_ext.convert(nn.Sequential(nn.Linear(3, 3)), return_report=True)
    assert "F.relu" in str(report) and "as a gradient would" in str(report)


@pytest.mark.parametrize(
    "module, reason",
    [(nn.ReLU(), "not folded: it is the whole model"), (nn.BatchNorm1d(3), "no DTP counterpart")],
)
def test_a_bare_plain_module_is_reported(module, reason):
    converted, report = dtp_ext.convert(module, return_report=True)
    assert type(converted) is type(module)
    assert len(report.left) == 1 and report.left[0][:2] == ("", type(module).__name__)
    assert reason in report.left[0][2]


def test_module_with_own_parameters_and_children_is_reported():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) * self.scale

    _, report = dtp_ext.convert(nn.Sequential(Scaled()), return_report=True)
    assert [(n, k) for n, k, _ in report.left] == [("0", "Scaled")]
    assert [n for n, _, _ in report.converted] == ["0.fc"]
