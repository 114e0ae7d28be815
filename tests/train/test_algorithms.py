"""Each training algorithm's step on tiny networks against hand-derived expectations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtp_ext
from dtp_ext.metrics import angle_degrees
from dtp_ext.reference import backprop_gradients, backprop_twin
from dtp_ext.train.algorithms import FeedbackSettings, make_algorithm
from dtp_ext.train.algorithms.feedback_sgd import MomentumSGD

BETA = 0.7


def linear_chain(widths=(4, 6, 6, 3), activation=None, seed=0):
    torch.manual_seed(seed)
    layers = [
        dtp_ext.Linear(
            widths[i],
            widths[i + 1],
            activation=activation if i < len(widths) - 2 else None,
            beta=BETA,
        )
        for i in range(len(widths) - 1)
    ]
    return nn.Sequential(*layers).double()


def settings(count, k=0, sigma=0.1, lr=0.0):
    return FeedbackSettings([k] * count, [sigma] * count, [lr] * count)


def batch(n=8, features=4, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=g
    )


def test_bp_step_is_plain_backprop():
    model = linear_chain(activation="elu")
    x, y = batch()
    algo = make_algorithm("bp", model, settings(2), (4,), 3)
    algo.train_step(x, y, 0)
    h = x
    for i, layer in enumerate(model):  # the same network written with torch.nn.functional
        h = F.linear(h, layer.weight, layer.bias)
        h = F.elu(h) if i < 2 else h
    expected = torch.autograd.grad(F.cross_entropy(h, y), [l.weight for l in model])
    for layer, g in zip(model, expected):
        torch.testing.assert_close(layer.weight.grad, g)


@pytest.mark.parametrize("name", ["ldrl", "dtp", "tp", "drl"])
def test_output_block_update_is_backprop(name):
    """docs/maths.md §3: the last block's target is s_N - beta*grad, so its update is BP's for any feedback."""
    model = linear_chain(activation="tanh")
    x, y = batch()
    algo = make_algorithm(name, model, settings(2), (4,), 3)
    ours = algo.update_directions(x, y)
    bp = backprop_gradients(model, algo.blocks, x, y)
    torch.testing.assert_close(ours[-1], bp[-1])
    assert angle_degrees(ours[0], bp[0]) > 1  # random feedback: the hidden layers differ


def test_ldrl_with_transposed_feedback_matches_backprop_in_linear_nets():
    model = linear_chain()
    for layer in model:
        layer.feedback_weight.copy_(layer.weight.t())
    x, y = batch()
    algo = make_algorithm("ldrl", model, settings(2), (4,), 3)
    for g, g_bp in zip(algo.update_directions(x, y), backprop_gradients(model, algo.blocks, x, y)):
        torch.testing.assert_close(g, g_bp)


def test_tp_with_exact_inverse_feedback_equals_difference_targets():
    """With G = F^-1 (square linear blocks), G(t) = s + G(t) - G(s): TP's targets are DTP's
    (the paper's form, every target through a feedback block)."""
    model = linear_chain(widths=(5, 5, 5, 5))
    with torch.no_grad():
        for layer in list(model)[1:]:
            w = torch.eye(5, dtype=torch.float64) + 0.3 * torch.randn(5, 5, dtype=torch.float64)
            layer.weight.copy_(w)
            layer.feedback_weight.copy_(torch.linalg.inv(w))
            layer.feedback_bias.copy_(-torch.linalg.inv(w) @ layer.bias)
    x, y = batch(features=5, classes=5)
    algo = make_algorithm("tp", model, settings(2), (5,), 5)
    algo.penultimate_target = "feedback"
    tp = algo.update_directions(x, y)
    ref = dtp_ext.reference.dtp_weight_gradients(list(model), x, y, BETA)  # paper-form DTP
    for g, (g_ref, _) in zip(tp, ref):
        torch.testing.assert_close(g, g_ref)


def _random_feedback_chain():
    """Three tanh/linear blocks 4-6-5-3 whose feedback weights are random, not W^T or W^-1."""
    model = linear_chain(widths=(4, 6, 5, 3), activation="tanh")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model:
            layer.feedback_weight.copy_(
                torch.randn(layer.feedback_weight.shape, generator=g, dtype=torch.float64)
            )
            layer.feedback_bias.copy_(
                0.3 * torch.randn(layer.feedback_bias.shape, generator=g, dtype=torch.float64)
            )
    return model


def _hand_targets(model, x, y, *, difference, penultimate):
    """docs/maths.md §3/§10 written out for the 3-block chain: s_n, then the targets t_3, t_2, t_1."""
    l1, l2, l3 = model
    s1 = torch.tanh(F.linear(x, l1.weight, l1.bias))
    s2 = torch.tanh(F.linear(s1, l2.weight, l2.bias))
    s3 = F.linear(s2, l3.weight, l3.bias)
    e = torch.softmax(s3, 1) - F.one_hot(y, 3).double()  # grad of the sum-reduced CE at s3
    t3 = s3 - BETA * e
    G3 = lambda v: F.linear(v, l3.feedback_weight, l3.feedback_bias)  # no activation
    G2 = lambda v: F.linear(torch.tanh(v), l2.feedback_weight, l2.feedback_bias)  # block 2's tanh
    if penultimate == "gradient":
        t2 = s2 - BETA * e @ l3.weight  # Lee et al. 2015: s2 - beta W3^T e
    else:
        t2 = s2 + G3(t3) - G3(s3) if difference else G3(t3)
    t1 = s1 + G2(t2) - G2(s2) if difference else G2(t2)
    return [s1, s2, s3], [t1.detach(), t2.detach(), t3.detach()]


def _hand_updates(model, x, y, **kw):
    """Gradients of sum_n 1/2 mean_b |s_n - t_n|^2 in the blocks' weights, over beta."""
    with torch.enable_grad():
        s, t = _hand_targets(model, x, y, **kw)
        # each block's input detached: a block's loss trains only its own weights
        h, outs = x, []
        for i, layer in enumerate(model):
            z = F.linear(h.detach(), layer.weight, layer.bias)
            outs.append(torch.tanh(z) if i < 2 else z)
            h = s[i]
        loss = sum(0.5 * ((o - ti) ** 2).sum(1).mean() for o, ti in zip(outs, t))
        return [g / BETA for g in torch.autograd.grad(loss, [l.weight for l in model])]


@pytest.mark.parametrize("name, difference", [("tp", False), ("dtp", True)])
@pytest.mark.parametrize("penultimate", ["gradient", "feedback"])
def test_reconstruction_algorithms_targets_by_hand(name, difference, penultimate):
    """TP: t_{n-1} = G_n(t_n); DTP: s_{n-1} + G_n(t_n) - G_n(s_n); the last hidden block's target
    is s - beta * dL/ds ("gradient", Lee et al.) or goes through the output block's G ("feedback",
    the paper's form, the default). Checked on the update directions and on the .grad a training step
    leaves."""
    model = _random_feedback_chain()
    x, y = batch()
    assert make_algorithm(name, model, settings(3), (4,), 3).penultimate_target == "feedback"
    algo = make_algorithm(name, model, settings(3), (4,), 3, penultimate_target=penultimate)
    expected = _hand_updates(model, x, y, difference=difference, penultimate=penultimate)
    for g, g_hand in zip(algo.update_directions(x, y), expected):
        torch.testing.assert_close(g, g_hand)
    algo.train_step(x, y, 0)  # K = 0: the feedback weights stay as they are
    for layer, g_hand in zip(model, expected):
        torch.testing.assert_close(layer.weight.grad, g_hand)
    bp = backprop_gradients(model, algo.blocks, x, y)
    if penultimate == "gradient":  # the last two blocks take backprop's step exactly
        torch.testing.assert_close(expected[1], bp[1])
    else:
        assert angle_degrees(expected[1], bp[1]) > 1
    assert angle_degrees(expected[0], bp[0]) > 1


def test_tp_targets_differ_between_the_two_penultimate_choices():
    """Guards the hand-derived test against the two choices coinciding on its network."""
    model = _random_feedback_chain()
    x, y = batch()
    a = _hand_updates(model, x, y, difference=False, penultimate="gradient")
    b = _hand_updates(model, x, y, difference=False, penultimate="feedback")
    assert angle_degrees(a[0], b[0]) > 5 and angle_degrees(a[1], b[1]) > 5


def test_dtp_explicit_targets_equal_the_fused_backward():
    """The paper's vanilla DTP by the DTP blocks' fused backward = the explicit paper-form targets."""
    from dtp_ext.train.algorithms.base import target_update_directions

    model = _random_feedback_chain()
    x, y = batch()
    algo = make_algorithm("dtp", model, settings(3), (4,), 3)
    algo.penultimate_target = "feedback"
    for g_fused, g_explicit in zip(
        algo.update_directions(x, y), target_update_directions(algo, x, y)
    ):
        torch.testing.assert_close(g_fused, g_explicit)


def test_unknown_penultimate_target_is_refused():
    from dtp_ext.train.algorithms.reconstruction import TargetProp

    with pytest.raises(ValueError, match="penultimate"):
        TargetProp(linear_chain(), settings(2), (4,), 3, penultimate_target="inverse")


def test_drl_with_transposed_direct_feedback_is_backprop_for_a_linear_net():
    """Two linear blocks: t_1 = h_1 + Q (t_2 - h_2); with Q = W_2^T the update is BP's."""
    model = linear_chain(widths=(4, 6, 3))
    x, y = batch()
    algo = make_algorithm("drl", model, settings(1), (4,), 3)
    with torch.no_grad():
        algo.Q[0].copy_(model[1].weight.t())
    for g, g_bp in zip(algo.update_directions(x, y), backprop_gradients(model, algo.blocks, x, y)):
        torch.testing.assert_close(g, g_bp)


def test_drl_q_gradient_matches_autograd():
    model = linear_chain(widths=(4, 6, 3), activation="tanh")
    x, y = batch()
    algo = make_algorithm("drl", model, settings(1, k=1, sigma=0.3, lr=0.1), (4,), 3)
    algo.feedback.momentum = 0.0
    q0 = algo.Q[0].clone()
    from dtp_ext.train.chain import forward_records

    logits, records = forward_records(model, x)
    torch.manual_seed(5)
    algo.train_feedback(records, logits, step=0)
    torch.manual_seed(5)
    h = records[0].output.detach()
    noise = torch.randn_like(h) * 0.3
    with torch.no_grad():
        d = model[1](h + noise) - logits.detach()
    q = q0.clone().requires_grad_(True)
    loss = ((d @ q.t() - noise) ** 2).sum(1).mean() / 0.3**2
    (grad,) = torch.autograd.grad(loss, q)
    torch.testing.assert_close(algo.Q[0], q0 - 0.1 * grad)


def test_vanilla_dtp_feedback_converges_to_the_inverse():
    """docs/maths.md §13.7: the reconstruction loss's fixed point for a square invertible W is W^-1."""
    torch.manual_seed(0)
    block = dtp_ext.Linear(3, 3).double()
    with torch.no_grad():
        block.weight.copy_(
            torch.eye(3, dtype=torch.float64) + 0.2 * torch.randn(3, 3, dtype=torch.float64)
        )
    x = torch.randn(64, 3, dtype=torch.float64)
    V, _, _, _ = dtp_ext.reference.feedback_loop(block, x, 1500, 0.5, 0.02, loss="reconstruction")
    block.feedback_weight.copy_(V)
    inverse = torch.linalg.inv(block.weight.detach())
    torch.testing.assert_close(block.feedback_weight, inverse, atol=2e-3, rtol=0)
    assert angle_degrees(block.feedback_weight, block.weight.t()) > 5  # not the transpose


def test_momentum_sgd_matches_torch_optim():
    p1 = torch.randn(4, requires_grad=True)
    p2 = p1.detach().clone()
    opt = torch.optim.SGD([p1], lr=0.1, momentum=0.9)
    ours = MomentumSGD(0.9)
    for _ in range(3):
        g = torch.randn(4)
        p1.grad = g.clone()
        opt.step()
        ours.step("p", p2, g, 0.1)
    torch.testing.assert_close(p1.detach(), p2)


def test_bp_forward_equals_the_dtp_models_forward():
    model = linear_chain(activation="elu")
    x, _ = batch()
    torch.testing.assert_close(backprop_twin(model)(x), model(x))


def test_backprop_twin_parameters_are_the_models_forward_parameters():
    """An optimizer built on the twin trains the model: the twin lists the model's weights,
    biases and BatchNorm affines (the same objects), and no feedback weight."""
    torch.manual_seed(0)
    model = dtp_ext.convert(
        nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)
        )
    )
    model(torch.randn(2, 3, 6, 6))
    twin = backprop_twin(model)
    expected = list(model.parameters())  # feedback weights are buffers
    assert [id(p) for p in twin.parameters()] == [id(p) for p in expected]
    assert not any("feedback" in name for name, _ in twin.named_buffers())
    before = [p.detach().clone() for p in expected]
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    F.cross_entropy(twin(torch.randn(8, 3, 6, 6)), torch.arange(8) % 2).backward()
    optimizer.step()
    assert all(p.grad is not None for p in expected)
    assert all(not torch.equal(b, p) for b, p in zip(before, expected))


def test_figure_commands_small(tmp_path, capsys):
    """JMC/GMP on a few iterations: files written, L-DRL's output block ahead of DRL's."""
    import json

    from dtp_ext.cli import main

    assert (
        main(["figure", "jmc", "--iterations", "300", "--batch-size", "64", "--out", str(tmp_path)])
        == 0
    )
    jmc = json.loads((tmp_path / "jmc.json").read_text())
    assert jmc["ldrl_angle"][0] > 80 and jmc["ldrl_angle"][-1] < jmc["ldrl_angle"][0]
    assert (tmp_path / "jmc.png").stat().st_size > 0
    assert (
        main(["figure", "gmp", "--iterations", "20", "--batch-size", "32", "--out", str(tmp_path)])
        == 0
    )
    gmp = json.loads((tmp_path / "gmp.json").read_text())
    assert set(gmp["angles"]) == {"ldrl", "ldrl-random", "drl"}
    assert gmp["angles"]["ldrl"]["fc"] < 1e-3
    assert main(["figure", "gmp", "--dataset", "cifar10", "--out", str(tmp_path)]) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_drl_s_variant_alternates_feedback_and_forward_epochs():
    """ "s": epochs 1, 3, ... train Q only (no forward gradient); epochs 2, 4, ... take the
    forward step with the frozen Q, the same gradients as "p" with that Q."""
    model = linear_chain(widths=(4, 6, 6, 3), activation="tanh")
    x, y = batch()
    s = make_algorithm("drl", model, settings(2, k=2, sigma=0.1, lr=0.05), (4,), 3, variant="s")
    assert make_algorithm("drl", model, settings(2), (4,), 3).variant == "p"
    q0 = [q.clone() for q in s.Q]
    s.epoch = 0
    s.train_step(x, y, 0)
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(q, q_old) for q, q_old in zip(s.Q, q0))  # Q trained
    s.epoch = 1
    q1 = [q.clone() for q in s.Q]
    s.train_step(x, y, 1)
    assert all(torch.equal(q, q_old) for q, q_old in zip(s.Q, q1))  # Q frozen
    expected = s.update_directions(x, y)  # the targets from the current Q, by hand-checked code
    for layer, g in zip(model, expected):
        torch.testing.assert_close(layer.weight.grad, g)
    with pytest.raises(ValueError, match="variant must be 'p' or 's'"):
        make_algorithm("drl", model, settings(2), (4,), 3, variant="q")
