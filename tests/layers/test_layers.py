"""dtp_ext.Linear / Conv2d as drop-in torch.nn layers, and dtp_ext.convert."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtp_ext

LINEAR_ARGS = [dict(in_features=5, out_features=3), dict(in_features=4, out_features=6, bias=False)]
CONV_ARGS = [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(
        in_channels=4,
        out_channels=6,
        kernel_size=(3, 5),
        stride=2,
        padding=(1, 2),
        dilation=1,
        groups=2,
        bias=False,
    ),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding="same", dilation=2),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding="valid"),
]


@pytest.mark.parametrize("kwargs", LINEAR_ARGS)
def test_linear_defaults_match_torch_exactly(kwargs):
    torch.manual_seed(0)
    ours = dtp_ext.Linear(**kwargs)
    theirs = nn.Linear(**kwargs)
    theirs.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if not k.startswith("feedback")}
    )
    for shape in [
        (7, kwargs["in_features"]),
        (2, 3, kwargs["in_features"]),
        (kwargs["in_features"],),
    ]:
        x = torch.randn(shape)
        assert torch.equal(ours(x), theirs(x))
    assert set(ours.state_dict()) == set(theirs.state_dict()) | {"feedback_weight", "feedback_bias"}
    assert ours.feedback_weight.shape == (kwargs["in_features"], kwargs["out_features"])
    assert ours.feedback_bias.shape == (kwargs["in_features"],)


@pytest.mark.parametrize("kwargs", CONV_ARGS)
def test_conv_defaults_match_torch_exactly(kwargs):
    torch.manual_seed(0)
    ours = dtp_ext.Conv2d(**kwargs)
    theirs = nn.Conv2d(**kwargs)
    theirs.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if not k.startswith("feedback")}
    )
    x = torch.randn(2, kwargs["in_channels"], 9, 10, requires_grad=True)
    assert torch.equal(ours(x), theirs(x))
    assert torch.equal(ours(x[0]), theirs(x[0]))  # unbatched input
    assert ours.feedback_weight.shape == ours.weight.shape
    assert ours.feedback_bias.shape == (kwargs["in_channels"],)


def test_activation_and_pool_attributes_and_forward():
    torch.manual_seed(0)
    block = dtp_ext.Conv2d(3, 4, 3, padding=1, activation="elu", pool=2, beta=0.5)
    assert (block.activation, block.pool, block.beta) == ("elu", 2, 0.5)
    x = torch.randn(2, 3, 8, 8)
    expected = F.max_pool2d(F.elu(F.conv2d(x, block.weight, block.bias, padding=1)), 2)
    assert torch.equal(block(x), expected)
    assert "activation='elu'" in repr(block) and "pool=2" in repr(block)


def test_feedback_weights_are_not_parameters_and_survive_optimizers():
    torch.manual_seed(0)
    model = nn.Sequential(dtp_ext.Linear(6, 5, activation="tanh"), dtp_ext.Linear(5, 3))
    names = {n for n, _ in model.named_parameters()}
    assert not any("feedback" in n for n in names)
    before = {k: v.clone() for k, v in model.state_dict().items() if "feedback" in k}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):
        opt.zero_grad()  # before the forward ...
        F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # ... and after the step
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_state_dict_round_trip_includes_feedback_weights():
    torch.manual_seed(0)
    model = nn.Sequential(
        dtp_ext.Conv2d(1, 2, 3, activation="relu", pool=2),
        nn.Flatten(),
        dtp_ext.Linear(2 * 3 * 3, 4),
    )
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    torch.manual_seed(1)
    fresh = nn.Sequential(
        dtp_ext.Conv2d(1, 2, 3, activation="relu", pool=2),
        nn.Flatten(),
        dtp_ext.Linear(2 * 3 * 3, 4),
    )
    assert not torch.equal(fresh[0].feedback_weight, model[0].feedback_weight)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # torch.nn twins load the forward part.
    plain = nn.Conv2d(1, 2, 3)
    missing = plain.load_state_dict(model[0].state_dict(), strict=False)
    assert set(missing.unexpected_keys) == {"feedback_weight", "feedback_bias"}


def test_eval_mode_records_nothing_and_train_mode_records_input():
    block = dtp_ext.Linear(3, 2)
    block.eval()
    block(torch.randn(4, 3))
    assert block.recorded_input is None
    block.train()
    x = torch.randn(4, 3)
    block(x)
    assert torch.equal(block.recorded_input, x)


def test_to_moves_and_casts_feedback_weights():
    block = dtp_ext.Conv2d(2, 3, 3).to(torch.float64)
    assert (
        block.feedback_weight.dtype == torch.float64 and block.feedback_bias.dtype == torch.float64
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(activation="gelu"), "activation"),
        (dict(pool=0), "pool"),
        (dict(pool=2.5), "pool"),
        (dict(beta=0.0), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(padding_mode="reflect"), "padding_mode"),
        (dict(padding="same", kernel_size=2), "same"),
    ],
)
def test_bad_constructor_arguments_are_rejected(kwargs, match):
    args = dict(in_channels=2, out_channels=3, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dtp_ext.Conv2d(**args)


def test_bad_inputs_are_rejected_with_shapes():
    with pytest.raises(ValueError, match="4 features"):
        dtp_ext.Linear(4, 2)(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\)"):
        dtp_ext.Conv2d(2, 3, 3)(torch.randn(1, 3, 8, 8))


def conv_net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ELU(),
        nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2, 2)),
        nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    )


def test_convert_keeps_outputs_and_folds_activations_and_pools():
    torch.manual_seed(0)
    model = conv_net().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    converted, report = dtp_ext.convert(model, beta=0.5, fold=True, return_report=True)
    assert converted is not model and isinstance(model[0], nn.Conv2d)  # not in place by default
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)
    assert converted[0].activation == "relu" and converted[0].pool == 2
    assert isinstance(converted[1], nn.Identity) and isinstance(converted[2], nn.Identity)
    assert converted[3].activation is None  # BatchNorm sits between the conv and its ELU
    assert converted[6][0].activation == "tanh" and converted[6][0].pool == 2
    assert converted[9].activation == "relu" and converted[11].activation is None
    assert all(b.beta == 0.5 for _, b in dtp_ext.dtp_blocks(converted))
    left = {name: why for name, _, why in report.left}
    assert "4" in left and "7" in left  # BatchNorm2d and the reflect-padded conv
    assert "BatchNorm2d" in str(report) and "padding_mode" in left["7"]
    assert isinstance(converted[7], nn.Conv2d) and not isinstance(converted[7], dtp_ext.DTPBlock)


def test_converted_model_trains_with_dtp_backward():
    torch.manual_seed(0)
    model = dtp_ext.convert(conv_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = dtp_ext.FeedbackTrainer(model, iterations=2, noise_std=0.1, lr=1e-3)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    out = model(x)
    trainer.step()
    F.cross_entropy(out, y).backward()
    opt.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_convert_a_bare_linear():
    lin = nn.Linear(3, 2)
    block = dtp_ext.convert(lin)
    assert isinstance(block, dtp_ext.Linear)
    assert torch.equal(block.weight, lin.weight)


def test_pool_larger_than_the_map_names_the_layer():
    block = dtp_ext.Conv2d(3, 4, 3, activation="relu", pool=2)
    with pytest.raises(
        ValueError, match=r"dtp_ext.Conv2d: pool=2 is larger than the conv's output map \(1x1"
    ):
        block(torch.randn(1, 3, 3, 3))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_an_empty_batch_gives_torch_nn_zero_gradients(kind):
    """torch.nn's backward on an empty batch: zero weight and bias gradients, an empty input
    gradient; the DTP blocks give the same (no op sees a batch without samples)."""
    torch.manual_seed(0)
    if kind == "linear":
        plain, shape = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), (0, 4)
    else:
        plain = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
        shape = (0, 2, 6, 6)
    converted = dtp_ext.convert(plain)
    for model in (plain, converted):
        x = torch.randn(shape, requires_grad=True)
        model(x).sum().backward()
        assert x.grad is not None and x.grad.shape == shape
        for p in model.parameters():
            assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()
