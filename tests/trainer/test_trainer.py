"""FeedbackTrainer and a full L-DRL training step against the reference."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtp_ext
from dtp_ext import reference


def simple_vgg_small(classes=10, channels=(4, 4, 6, 6, 8)):
    """SimpleVGG's shape (docs/maths.md §1) with small channels: 5 x (conv3x3, ELU, pool2), linear."""
    layers, cin = [], 3
    for c in channels:
        layers.append(dtp_ext.Conv2d(cin, c, 3, padding=1, activation="elu", pool=2))
        cin = c
    return nn.Sequential(*layers, nn.Flatten(), dtp_ext.Linear(cin, classes)).double()


PAPER = dict(
    iterations=[2, 3, 3, 4, 2],
    noise_std=[0.4, 0.4, 0.2, 0.2, 0.08],
    lr=[1e-4, 3.5e-4, 8e-3, 8e-3, 0.18],
)


def test_full_training_step_equals_reference_step():
    """Feedback phase + targets + forward SGD step of a SimpleVGG-shaped network, float64."""
    torch.manual_seed(0)
    model = simple_vgg_small()
    ref_model = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    trainer = dtp_ext.FeedbackTrainer(model, momentum=0.9, **PAPER)
    opt = torch.optim.SGD(model.parameters(), lr=0.035, momentum=0.9, weight_decay=1e-4)

    torch.manual_seed(7)
    out = model(x)
    report = trainer.step()
    loss = F.cross_entropy(out, y)
    opt.zero_grad()
    loss.backward()
    opt.step()

    # The reference: torch.optim.SGD on autograd losses, then the paper's targets.
    torch.manual_seed(7)
    blocks = [m for _, m in dtp_ext.dtp_blocks(ref_model)]
    with torch.no_grad():
        inputs, s = [], x
        for m in ref_model:
            if isinstance(m, dtp_ext.DTPBlock):
                inputs.append(s)
            s = m(s)
    for i, block in enumerate(blocks[1:]):
        v, c, losses, _ = reference.feedback_loop(
            block, inputs[i + 1], PAPER["iterations"][i], PAPER["noise_std"][i], PAPER["lr"][i], 0.9
        )
        block.feedback_weight.copy_(v)
        block.feedback_bias.copy_(c)
        name = [n for n, m in dtp_ext.dtp_blocks(model)][i + 1]
        torch.testing.assert_close(report.losses[name], losses, rtol=1e-8, atol=1e-10)
    grads = reference.dtp_weight_gradients(blocks, x, y, beta=0.7)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.035, momentum=0.9, weight_decay=1e-4)
    for block, (gw, gb) in zip(blocks, grads):
        block.weight.grad, block.bias.grad = gw, gb
    ref_opt.step()
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v, v2, rtol=1e-8, atol=1e-10, msg=k)
    assert set(report.kernels.values()) == {"dtp_ext::ldrl_feedback_loop[CPU]"}


def test_trainer_reproducible_with_manual_seed():
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = simple_vgg_small()
        trainer = dtp_ext.FeedbackTrainer(model, **PAPER)
        model(torch.randn(3, 3, 32, 32, dtype=torch.float64))
        trainer.step()
        results.append([b.feedback_weight.clone() for _, b in dtp_ext.dtp_blocks(model)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_first_block_is_not_trained_and_lists_follow_trained_blocks():
    model = simple_vgg_small()
    trainer = dtp_ext.FeedbackTrainer(model, iterations=1, noise_std=0.1, lr=0.01)
    first = model[0].feedback_weight.clone()
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    names = [n for n, _ in trainer.blocks]
    assert names == ["1", "2", "3", "4", "6"]
    trainer.step()
    assert torch.equal(first, model[0].feedback_weight)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(iterations=[1, 2]), "iterations has 2 entries"),
        (dict(lr=-1.0), "lr entries must be finite numbers >= 0"),
        (dict(noise_std=[0.1] * 4 + [float("nan")]), "noise_std"),
        (dict(iterations=1.5), "whole numbers"),
        (dict(momentum=1.0), "momentum"),
        (dict(weight_decay=-1.0), "weight_decay"),
    ],
)
def test_bad_trainer_arguments(kwargs, match):
    args = dict(iterations=1, noise_std=0.1, lr=0.01)
    args.update(kwargs)
    model = simple_vgg_small()
    model(torch.randn(1, 3, 32, 32, dtype=torch.float64))  # the trained blocks are known now
    with pytest.raises(ValueError, match=match):
        dtp_ext.FeedbackTrainer(model, **args)


def test_step_without_forward_and_model_without_blocks():
    trainer = dtp_ext.FeedbackTrainer(simple_vgg_small(), iterations=1, noise_std=0.1, lr=0.01)
    with pytest.raises(RuntimeError, match="no recorded forward pass"):
        trainer.step()
    with pytest.raises(ValueError, match="no dtp_ext"):
        dtp_ext.FeedbackTrainer(nn.Sequential(nn.Linear(2, 2)), iterations=1, noise_std=0.1, lr=0.1)


def test_trainer_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = simple_vgg_small()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    trainer = dtp_ext.FeedbackTrainer(model, **PAPER)
    model(x)
    trainer.step()
    saved_model, saved_trainer = copy.deepcopy(model.state_dict()), trainer.state_dict()
    torch.manual_seed(1)
    trainer.step()
    expected = [b.feedback_weight.clone() for _, b in dtp_ext.dtp_blocks(model)]

    model2 = simple_vgg_small()
    model2.load_state_dict(saved_model)
    trainer2 = dtp_ext.FeedbackTrainer(model2, **PAPER)
    trainer2.load_state_dict(saved_trainer)
    model2(x)
    torch.manual_seed(1)
    trainer2.step()
    for a, (_, b) in zip(expected, dtp_ext.dtp_blocks(model2)):
        assert torch.equal(a, b.feedback_weight)
    with pytest.raises(ValueError, match="blocks"):
        dtp_ext.FeedbackTrainer(
            model2, iterations=1, noise_std=0.1, lr=0.1, blocks=["1", "2"]
        ).load_state_dict(saved_trainer)


def test_choose_blocks_explicitly():
    model = simple_vgg_small()
    trainer = dtp_ext.FeedbackTrainer(
        model, iterations=[1, 1], noise_std=0.1, lr=0.01, blocks=[model[2], "6"]
    )
    assert [n for n, _ in trainer.blocks] == ["2", "6"]
    with pytest.raises(ValueError, match="not a DTP block"):
        dtp_ext.FeedbackTrainer(model, iterations=1, noise_std=0.1, lr=0.01, blocks=["5"])


def test_divergence_is_refused_and_weights_restored():
    torch.manual_seed(0)
    model = simple_vgg_small()
    trainer = dtp_ext.FeedbackTrainer(
        model, iterations=[2, 3, 3, 200, 2], noise_std=0.1, lr=[1e-3, 1e-3, 1e-3, 1e6, 1e-3]
    )
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    before = {n: b.feedback_weight.clone() for n, b in trainer.blocks}
    with pytest.raises(FloatingPointError, match=r"block '4' diverged .* iteration \d+"):
        trainer.step()
    blocks = dict(trainer.blocks)
    assert torch.equal(blocks["4"].feedback_weight, before["4"])
    assert all(torch.isfinite(b.feedback_weight).all() for _, b in trainer.blocks)
    assert torch.isfinite(trainer.state_dict()["momentum_buffers"]["4"]["weight"]).all()


def test_non_finite_recorded_input_is_named():
    model = simple_vgg_small()
    trainer = dtp_ext.FeedbackTrainer(model, iterations=1, noise_std=0.1, lr=1e-3)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    x[0, 0, 0, 0] = float("nan")
    model(x)
    with pytest.raises(FloatingPointError, match="recorded input is not finite"):
        trainer.step()


def test_mismatched_state_dicts_are_refused_with_the_reason():
    model = simple_vgg_small()
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    trainer = dtp_ext.FeedbackTrainer(model, **PAPER)
    trainer.step()
    state = trainer.state_dict()
    wider = simple_vgg_small(channels=(4, 4, 6, 6, 9))
    with pytest.raises(
        ValueError,
        match=r"momentum buffer of '\d+' has shape .* expected .*: this model's block '\d+' is "
        "not the layer the state was saved from",
    ):
        dtp_ext.FeedbackTrainer(wider, **PAPER).load_state_dict(state)
    # Another model, whose blocks have other names: named, with the model's own.
    renamed = nn.Sequential(nn.Identity(), *model)
    with pytest.raises(
        ValueError, match=r"this model has no DTP blocks named \[.*\] \(its blocks: \['1', "
    ):
        dtp_ext.FeedbackTrainer(renamed, **PAPER).load_state_dict(state)
    # A damaged state (an average without its count) says what is missing.
    averaged = dtp_ext.FeedbackTrainer(model, average_decay=0.9)
    averaged.step()
    averaged.step()
    damaged = averaged.state_dict()
    assert damaged["averages"]["weights"]
    damaged["averages"]["counts"] = {}
    with pytest.raises(ValueError, match="the state has no counts entry for it: a damaged state"):
        dtp_ext.FeedbackTrainer(model, average_decay=0.9).load_state_dict(damaged)
    with pytest.raises(ValueError, match="expected a dict from FeedbackTrainer.state_dict"):
        trainer.load_state_dict(model.state_dict())
    # A model's state_dict of another shape: torch's own message names the feedback buffer too.
    with pytest.raises(RuntimeError, match="size mismatch for 6.feedback_weight"):
        wider.load_state_dict(model.state_dict())
    # A plain torch.nn checkpoint lacks the feedback weights: strict loading says so.
    with pytest.raises(
        RuntimeError, match=r"Missing key\(s\) in state_dict: \"0.feedback_weight\""
    ):
        model.load_state_dict({k: v for k, v in model.state_dict().items() if "feedback" not in k})


def test_a_refused_state_dict_writes_no_buffer():
    """load_state_dict copies into the existing momentum buffers, but only once every buffer
    has passed its check: a state whose last buffer has the wrong shape leaves all of them."""
    model = simple_vgg_small()
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    trainer = dtp_ext.FeedbackTrainer(model, **PAPER)
    trainer.step()
    before = trainer.state_dict()["momentum_buffers"]
    state = trainer.state_dict()
    for buffers in state["momentum_buffers"].values():
        for v in buffers.values():
            v.add_(1.0)
    last = list(state["momentum_buffers"])[-1]
    state["momentum_buffers"][last]["weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="momentum buffer of"):
        trainer.load_state_dict(state)
    after = trainer.state_dict()["momentum_buffers"]
    for name in before:
        for k in before[name]:
            assert torch.equal(after[name][k], before[name][k]), (name, k)


def test_warnings_name_the_users_call():
    """The trainer's warnings carry the file and line of the user's step() call, not a line
    of dtp_ext or of torch's no_grad decorator."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 72), dtp_ext.Linear(72, 72), dtp_ext.Linear(72, 3))
    trainer = dtp_ext.FeedbackTrainer(model, iterations=1, noise_std=1.0, lr=0.5, max_growth=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # forward weights move before any feedback step: a warning
    model(torch.randn(2, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.step()
    assert len(caught) == 3  # two blocks predicted unstable, one forward-before-feedback
    assert {(w.filename, w.category) for w in caught} == {(__file__, RuntimeWarning)}
