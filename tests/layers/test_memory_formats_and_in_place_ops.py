"""torch.nn idioms on converted models: memory formats and in-place ops on block outputs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtp_ext


def two_convs():
    torch.manual_seed(0)
    # A trainable first conv (the stem) so both DTP blocks need targets.
    stem = nn.Conv2d(3, 3, 1)
    return nn.Sequential(
        stem,
        *dtp_ext.convert(
            nn.Sequential(
                nn.Conv2d(3, 8, 3),
                nn.ELU(),
                nn.MaxPool2d(2),
                nn.Conv2d(8, 8, 3),
                nn.Flatten(),
                nn.Linear(8 * 5 * 5, 4),
            ),
            fold=True,
        ),
    ).double()


def train_step(model, x, y):
    torch.manual_seed(3)
    trainer = dtp_ext.FeedbackTrainer(model, iterations=3, noise_std=0.1, lr=1e-2)
    out = model(x)
    report = trainer.step()
    F.cross_entropy(out, y).backward()
    return out, report


def test_channels_last_model_trains_like_the_contiguous_one():
    model = two_convs()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert not cl[1].feedback_weight.is_contiguous()  # the case the loops used to refuse
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 4, (4,))
    out, report = train_step(model, x, y)
    out_cl, report_cl = train_step(cl, x.contiguous(memory_format=torch.channels_last), y)
    assert list(report.losses) == list(report_cl.losses) == ["1", "4", "6"]
    torch.testing.assert_close(out_cl, out, rtol=1e-10, atol=1e-12)
    for name in report.losses:
        torch.testing.assert_close(
            report_cl.losses[name], report.losses[name], rtol=1e-10, atol=1e-12
        )
    for (k, a), (_, b) in zip(model.state_dict().items(), cl.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=k)
    for (k, a), (_, b) in zip(model.named_parameters(), cl.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=k)
    assert cl[1].feedback_weight.is_contiguous(memory_format=torch.channels_last)  # kept its layout


def test_feedback_loop_writes_back_into_non_contiguous_state():
    block = dtp_ext.Conv2d(3, 4, 3, padding=1, activation="elu", pool=2).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    state = [
        block.feedback_weight.clone(),
        block.feedback_bias.clone(),
        torch.zeros_like(block.feedback_weight),
        torch.zeros_like(block.feedback_bias),
    ]
    strided = [
        t.clone().contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.clone()
        for t in state
    ]
    args = (5, 0.1, 0.01, 0.9, 1e-3, 2, block.geometry())
    torch.manual_seed(0)
    dtp_ext.ops.ldrl_feedback_loop(x, block.weight, block.bias, *state, *args)
    torch.manual_seed(0)
    dtp_ext.ops.ldrl_feedback_loop(x, block.weight, block.bias, *strided, *args)
    for a, b in zip(state, strided):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("tail", [[nn.ReLU(), nn.MaxPool2d(2)], [nn.Tanh()], [nn.ELU()]])
def test_in_place_op_on_a_block_output(tail):
    """torch.nn lets a max-pool's output be modified in place; so must a block that folded it."""
    torch.manual_seed(0)
    model = dtp_ext.convert(nn.Sequential(nn.Conv2d(3, 8, 3), *tail), fold=True).double()
    assert len(dtp_ext.dtp_blocks(model)) == 1 and model[0].activation is not None
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    model(x).mul_(0.5).sum().backward()
    in_place = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (model(x) * 0.5).sum().backward()
    for a, b in zip(in_place, model.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=0, atol=0)


def test_ldrl_loss_with_a_channels_last_feedback_weight():
    block = dtp_ext.Conv2d(3, 4, 3, padding=1, activation="elu", pool=2).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    nx, ny = torch.randn_like(x) * 0.1, torch.randn(2, 4, 4, 4, dtype=torch.float64) * 0.1
    w, b = block.weight.detach(), block.bias.detach()
    v = block.feedback_weight
    expected = dtp_ext.ops.ldrl_loss(x, w, b, v, nx, ny, block.geometry())
    got = dtp_ext.ops.ldrl_loss(
        x, w, b, v.contiguous(memory_format=torch.channels_last), nx, ny, block.geometry()
    )
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
