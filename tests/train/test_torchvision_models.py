"""`dtp-ext train --model resnet18` (and the other torchvision names): converted, adapted to
MNIST's 1x28x28 images, trained by bp and ldrl end to end, resumed bitwise."""

import json
import sys

import pytest
import torch

import dtp_ext
from dtp_ext.cli import main
from tests.helpers.tiny_runs import tiny_args

TINY = [
    "--model",
    "resnet18",
    *tiny_args(train=12, test=16, batch=4, probe=4, eval=16),
    "--feedback-iterations",
    "1",
]


@pytest.fixture
def torchvision():
    return pytest.importorskip("torchvision")


def train(*argv):
    return main(["train", *argv])


@pytest.mark.parametrize("algorithm", ["bp", "ldrl"])
@pytest.mark.integration
def test_resnet18_on_mnist(tmp_path, torchvision, algorithm):
    out = tmp_path / algorithm
    assert train("--algorithm", algorithm, "--max-steps", "3", "--out", str(out), *TINY) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 3 and summary["config"]["model"] == "resnet18"
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert state["conv1.weight"].shape == (64, 1, 3, 3)  # stem adapted to MNIST (CIFAR-style)
    assert state["fc.weight"].shape == (10, 512)
    angles = summary["alignment"]["update_angle"]
    blocks = [k[: -len(".feedback_weight")] for k in state if k.endswith(".feedback_weight")]
    assert sorted(angles) == sorted(blocks) and len(blocks) == 21
    assert all(torch.isfinite(v.double()).all() for v in state.values())
    if algorithm == "bp":
        assert max(angles.values()) < 1e-3  # bp's own update is backprop's gradient
    else:
        assert angles["fc"] < 1e-3  # the output block's gradient is exactly backprop's
        assert min(angles[b] for b in blocks if b != "fc") > 1  # the others go through feedback
        assert sorted(summary["alignment"]["weight_angle"]) == sorted(set(blocks) - {"conv1"})


@pytest.mark.parametrize("algorithm", [pytest.param("bp", marks=pytest.mark.slow), "ldrl"])
@pytest.mark.integration
def test_resnet18_resume_equals_an_uninterrupted_run(tmp_path, torchvision, algorithm):
    common = ["--algorithm", algorithm, *TINY]  # 3 steps per epoch
    assert train(*common, "--max-steps", "4", "--epochs", "2", "--out", str(tmp_path / "a")) == 0
    assert train(*common, "--max-steps", "2", "--epochs", "2", "--out", str(tmp_path / "b")) == 0
    assert (
        train(
            "--resume",
            "--out",
            str(tmp_path / "b"),
            "--max-steps",
            "4",
            "--no-progress",
            "--threads",
            "1",
        )
        == 0
    )
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:  # weights, feedback weights and BatchNorm statistics
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


@pytest.mark.parametrize("algorithm", ["dtp", "tp", "drl"])
def test_chain_algorithms_refuse_torchvision_models(tmp_path, capsys, algorithm):
    assert (
        train("--algorithm", algorithm, "--max-steps", "1", "--out", str(tmp_path / "r"), *TINY)
        == 2
    )
    err = capsys.readouterr().err
    assert f"algorithm '{algorithm}' cannot train model 'resnet18'" in err
    assert "chain" in err and "bp or ldrl" in err
    assert not (tmp_path / "r").exists()


def test_without_torchvision_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` fails
    assert train("--max-steps", "1", "--out", str(tmp_path / "r"), *TINY) == 2
    err = capsys.readouterr().err
    assert "need torchvision" in err and "pip install torchvision" in err


@pytest.mark.parametrize(
    "name", ["resnet18", "vgg11_bn", "mobilenet_v2", "squeezenet1_1", "resnet-small"]
)
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_every_torchvision_model_builds_for_small_images(torchvision, name, channels, size):
    from dtp_ext.train.catalog import build_model, trained_block_count

    torch.manual_seed(0)
    model = build_model(name, channels, size, 10, 0.5)
    blocks = dtp_ext.dtp_blocks(model)
    assert all(b.beta == 0.5 for _, b in blocks)
    assert blocks[0][1].in_channels == channels
    x = torch.randn(2, channels, size, size)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # resolve's per-layer lists have one entry per block the trainer trains.
    model.train()
    model(x)
    trainer = dtp_ext.FeedbackTrainer(model, iterations=1, noise_std=0.1, lr=1e-3)
    assert trained_block_count(name, channels, size, 10) == len(trainer.blocks)


def test_default_feedback_settings_are_the_trainers_plan(torchvision):
    """The torchvision models leave iterations and lr to FeedbackTrainer's per-block plan (the
    library's one rule): resolve keeps them None; the plan scales each block's lr to its
    output positions P (lr x 2 noise^2 P x iterations = the planned step rate, lower only where
    stability needs it), P read here from a real forward pass; an explicit --feedback-lr
    stays one value for all."""
    from dtp_ext.alignment import STEP_RATE
    from dtp_ext.train.catalog import build_model
    from dtp_ext.train.config import TrainConfig
    from dtp_ext.train.resolve import resolve

    cfg = resolve(TrainConfig(model="resnet-small", feedback_noise=0.2, out="unused"))
    assert cfg.feedback_iterations is None and cfg.feedback_lr is None
    assert cfg.feedback_noise == [0.2] * 15
    model = build_model("resnet-small", 1, 28, 10, 0.7)
    seen = {}

    def positions(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output[0, 0].numel())

        return hook

    hooks = [b.register_forward_hook(positions(n)) for n, b in dtp_ext.dtp_blocks(model)]
    model(torch.randn(8, 1, 28, 28))
    for h in hooks:
        h.remove()
    trainer = dtp_ext.FeedbackTrainer(model, cfg.feedback_iterations, cfg.feedback_noise, None)
    trainer.explain()  # plans from the recorded inputs
    plans = trainer.plans
    assert set(plans) == set(list(seen)[1:])  # the stem conv sees the data
    assert len({seen[n] for n in plans}) == 4  # 28², 14², 7², 1
    for name, plan in plans.items():
        rate = plan.lr * 2 * 0.2**2 * seen[name] * plan.iterations
        assert rate == pytest.approx(STEP_RATE) or rate < STEP_RATE, name
    assert (
        resolve(TrainConfig(model="resnet-small", feedback_lr=1e-3, out="unused")).feedback_lr
        == [1e-3] * 15
    )
