"""dtp_ext.convert on real torchvision architectures (random weights, nothing downloaded):
outputs unchanged, one L-DRL training step keeps every weight finite, and the report lists
every module left plain. Skipped without torchvision (an optional extra)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtp_ext
from tests.helpers.models import plain_leaves

torchvision = pytest.importorskip("torchvision")

# name -> {plain module: what its reason must say}, and the blocks that fold an activation.
EXPECTED = {
    "resnet18": (
        {
            "bn1": "no DTP counterpart",
            "relu": "ResNet is not an nn.Sequential",
            "maxpool": "kernel_size=3, stride=2, padding=1",
            "layer1.0.relu": "BasicBlock is not an nn.Sequential",
            "avgpool": "pooling without a DTP counterpart",
        },
        {},
    ),
    "vgg11_bn": (
        {
            "features.1": "no DTP counterpart",
            "features.2": "not folded: it follows BatchNorm2d",  # ReLU after a BatchNorm
            "features.3": "not folded: it follows ReLU",  # its MaxPool2d
            "avgpool": "pooling without a DTP counterpart",
            "classifier.2": "no DTP counterpart (parameter-free)",
        },
        {"classifier.0": ["ReLU"], "classifier.3": ["ReLU"]},
    ),
    "mobilenet_v2": (
        {
            "features.0.1": "no DTP counterpart",
            "features.0.2": "activation without a DTP counterpart",  # ReLU6
            "classifier.0": "no DTP counterpart (parameter-free)",
        },
        {},
    ),
    "squeezenet1_1": (
        {
            "features.2": "ceil_mode=True",
            "features.3.squeeze_activation": "Fire is not an nn.Sequential",
            "classifier.0": "no DTP counterpart (parameter-free)",
            "classifier.3": "pooling without a DTP counterpart",
        },
        {"features.0": ["ReLU"], "classifier.1": ["ReLU"]},
    ),
}
MODELS = list(
    EXPECTED
)  # the whole file: ~35 s on 2 cores, most of it vgg11_bn's 103M-weight Linear


def build(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    model.train()
    with torch.no_grad():  # BatchNorm running statistics away from their initial 0 / 1
        model(torch.randn(4, 3, 32, 32))
    return model


def trainable_count(model):
    return sum(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize("name", MODELS)
def test_convert_keeps_eval_output_and_reports_every_plain_module(name):
    original = build(name)
    converted, report = dtp_ext.convert(original, fold=True, return_report=True)
    x = torch.randn(3, 3, 32, 32)
    original.eval()
    converted.eval()
    with torch.no_grad():
        assert torch.equal(converted(x), original(x))
    assert len(report.converted) == len(dtp_ext.dtp_blocks(converted)) == trainable_count(original)
    left = {n: why for n, _, why in report.left}
    assert set(left) == plain_leaves(original, converted, report)
    reasons, folded = EXPECTED[name]
    for module, says in reasons.items():
        assert says in left[module], (module, left[module])
    assert {n: f for n, _, f in report.converted if f} == folded
    assert all(f"  {n}: {k} ({why})" in str(report) for n, k, why in report.left)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.integration
def test_one_training_step_leaves_every_weight_finite(name):
    converted = dtp_ext.convert(build(name))
    blocks = dtp_ext.dtp_blocks(converted)
    trainer = dtp_ext.FeedbackTrainer(converted, iterations=2, noise_std=0.05, lr=1e-4)
    opt = torch.optim.SGD(converted.parameters(), lr=0.01, momentum=0.9)
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    converted.train()
    out = converted(x)
    trainer.step()
    F.cross_entropy(out, y).backward()
    opt.step()
    # Every block but the stem, whose input is the data, trains its feedback (docs/maths.md §5).
    assert {n for n, _ in trainer.blocks} == {n for n, _ in blocks[1:]}
    after = converted.state_dict()
    stem = blocks[0][0]
    assert torch.equal(after[f"{stem}.feedback_weight"], before[f"{stem}.feedback_weight"])
    for n, _ in blocks[1:]:
        assert not torch.equal(after[f"{n}.feedback_weight"], before[f"{n}.feedback_weight"]), n
    for n, p in converted.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and torch.isfinite(p).all(), n
    for n, block in blocks:  # (some BatchNorm biases have an exact zero gradient, as in backprop)
        assert not torch.equal(block.weight, before[f"{n}.weight"]), n
    for n, b in converted.named_buffers():
        assert torch.isfinite(b.double()).all(), n
