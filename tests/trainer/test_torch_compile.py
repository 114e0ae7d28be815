"""torch.compile (inductor, CPU) on models with DTP blocks: forward, DTP backward and
FeedbackTrainer.step() equal eager mode, with no graph break inside the blocks."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtp_ext

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.integration]


def simple_vgg_small(classes=10, channels=(4, 4, 6, 6, 8)):
    layers, cin = [], 3
    for c in channels:
        layers.append(dtp_ext.Conv2d(cin, c, 3, padding=1, activation="elu", pool=2))
        cin = c
    return nn.Sequential(*layers, nn.Flatten(), dtp_ext.Linear(cin, classes))


class BasicBlock(nn.Module):
    """torchvision's residual BasicBlock: conv-BN-ReLU-conv-BN plus a (projected) skip."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            None
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def residual_net():
    return dtp_ext.convert(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            BasicBlock(8, 8, 1),
            BasicBlock(8, 16, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )
    )


MODELS = {"simplevgg": simple_vgg_small, "residual-bn": residual_net}


def train_step(model, trainer, x, y, scale=None):
    torch.manual_seed(5)
    out = model(x)
    report = trainer.step()
    loss = F.cross_entropy(out, y)
    if scale is None:
        loss.backward()
    else:
        with dtp_ext.loss_scale(scale):
            (scale * loss).backward()
    return out.detach(), report


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_training_step_equals_eager(name):
    torch.manual_seed(0)
    eager = MODELS[name]()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="inductor")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    results = []
    for model, run in ((eager, eager), (compiled_model, compiled)):
        trainer = dtp_ext.FeedbackTrainer(model, iterations=3, noise_std=0.1, lr=1e-3)
        # Two steps: the second runs the compiled graph again (no recompilation per call) and
        # a scaled loss, which a compiled backward must read at run time.
        first = train_step(run, trainer, x, y)
        grads_first = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        second = train_step(run, trainer, x, y, scale=256.0)
        results.append(
            (
                first,
                second,
                grads_first,
                [p.grad / 256.0 for p in model.parameters()],
                [b.feedback_weight.clone() for _, b in dtp_ext.dtp_blocks(model)],
                [n for n, _ in trainer.blocks],
            )
        )
    (e1, e2, eg1, eg2, efw, enames), (c1, c2, cg1, cg2, cfw, cnames) = results
    assert enames == cnames
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c1[0], e1[0], **tol)
    torch.testing.assert_close(c2[0], e2[0], **tol)
    for name in e1[1].losses:
        torch.testing.assert_close(c1[1].losses[name], e1[1].losses[name], **tol)
    for a, b in zip(cg1 + cg2 + cfw, eg1 + eg2 + efw):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_graph_break(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_forward_order_is_recorded_under_compile():
    """Per-block lists follow forward order also when only compiled forwards ran."""
    from tests.helpers.models import HeadFirst

    model = dtp_ext.convert(HeadFirst())
    compiled = torch.compile(model, backend="inductor")
    for _ in range(2):
        compiled(torch.randn(2, 1, 8, 8))
    trainer = dtp_ext.FeedbackTrainer(model, iterations=[1, 2], noise_std=0.1, lr=1e-3)
    assert [n for n, _ in trainer.blocks] == ["body.2", "head"]


@pytest.mark.parametrize("fullgraph", [False, True])
def test_trainer_on_a_submodule_of_the_compiled_model(fullgraph):
    """The pass-tracking hooks a trainer puts on a submodule compile inside the parent's graph:
    no graph break (fullgraph=True compiles), and the block called twice records both calls."""
    torch._dynamo.reset()

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(dtp_ext.Linear(4, 4, activation="tanh"))
            self.head = dtp_ext.Linear(4, 3)

        def forward(self, x):
            return self.head(self.body(self.body(x)))

    model = Parent()
    trainer = dtp_ext.FeedbackTrainer(model.body, iterations=1, noise_std=0.1, lr=0.01)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    compiled(torch.randn(6, 4, requires_grad=True)).sum().backward()
    assert model.body[0].recorded_input.shape == (6, 4)  # its own pass per body call: the last
    trainer.step()


def test_compiled_float16_scaled_backward_equals_eager():
    """A compiled backward divides the loss scale out of the target step, as eager does,
    instead of dividing a float16 delta (which GradScaler's scale keeps out of underflow)."""
    torch.manual_seed(0)
    eager = nn.Sequential(
        dtp_ext.Linear(16, 32, activation="tanh"),
        dtp_ext.Linear(32, 32, activation="tanh"),
        dtp_ext.Linear(32, 4),
    ).half()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    x = torch.randn(8, 16, dtype=torch.float16)
    y = torch.randint(0, 4, (8,))
    k = 16384.0
    grads = []
    for model, run in ((eager, eager), (compiled_model, compiled)):
        with dtp_ext.loss_scale(k):
            (k * F.cross_entropy(run(x).float(), y)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g_eager, g_compiled in zip(*grads):
        torch.testing.assert_close(g_compiled, g_eager, rtol=0, atol=0)
