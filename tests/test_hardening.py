"""Adversarial inputs to the ops and the trainer: bad indices, aliasing, saturated pools, long
loops, impossible sizes and explosions that stay finite."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from torch import nn

import dtp_ext
from dtp_ext import ops, reference


def pooled_block():
    torch.manual_seed(0)
    b = dtp_ext.Conv2d(3, 4, 3, padding=1, activation="relu", pool=2)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out, idx = b.forward_with_indices(x)
    return b, x, out, idx


@pytest.mark.parametrize("bad", [10**9, -1, 64, 63, 2, 10, 16, -(2**63), 2**63 - 1])
def test_pool_indices_outside_their_window_are_refused(bad):
    """Outside the plane (10**9, -1, 64, the int64 extremes) or inside it but in another pool
    window (63, 2, 10, 16: the first window is positions 0, 1, 8, 9): refused by the op, as each pooled element owns its
    window (on CUDA its thread writes that window and nothing else)."""
    b, x, out, idx = pooled_block()
    idx = idx.clone()
    idx.view(-1)[0] = bad
    delta = torch.randn_like(out)
    with pytest.raises(
        IndexError,
        match=r"dtp_ext.propagate_target: indices must lie in \[0, 64\).*got " + str(bad),
    ):
        ops.propagate_target(out, idx, delta, b.feedback_weight, 1.4, x.shape, b.geometry())
    with pytest.raises(
        IndexError,
        match=r"dtp_ext.block_weight_grad: indices must lie in \[0, 64\), each in its own 2x2 "
        r"pool window .* for the window at row 0, column 0",
    ):
        ops.block_weight_grad(x, out, idx, delta, b.weight, b.geometry())
    idx.view(-1)[0] = 9  # the last position of the first window is valid
    ops.propagate_target(out, idx, delta, b.feedback_weight, 1.4, x.shape, b.geometry())
    ops.block_weight_grad(x, out, idx, delta, b.weight, b.geometry())


def loop_args(block, x, **state):
    fw = state.get("fw", block.feedback_weight)
    fb = state.get("fb", block.feedback_bias)
    mw = state.get("mw", torch.zeros_like(block.feedback_weight))
    mb = state.get("mb", torch.zeros_like(block.feedback_bias))
    return (x, state.get("w", block.weight.detach()), block.bias.detach(), fw, fb, mw, mb)


@pytest.mark.parametrize(
    "case, match",
    [
        ("feedback_weight is weight", "feedback_weight and weight share memory"),
        ("momentum is feedback_weight", "feedback_weight and momentum_weight share memory"),
        ("expanded momentum_bias", "momentum_bias has elements that share memory"),
        ("feedback_bias inside x", "feedback_bias and x share memory"),
    ],
)
def test_overlapping_in_place_arguments_are_refused(case, match):
    b, x, _, _ = pooled_block()
    w = b.weight.detach()
    state = {
        "feedback weight is weight": {},
        "feedback_weight is weight": {"fw": w},
        "momentum is feedback_weight": {"mw": b.feedback_weight},
        "expanded momentum_bias": {"mb": torch.zeros(1).expand(3)},
        "feedback_bias inside x": {"fb": x.view(-1)[:3]},
    }[case]
    before = w.clone()
    with pytest.raises(RuntimeError, match=f"dtp_ext.ldrl_feedback_loop: {match}"):
        ops.ldrl_feedback_loop(*loop_args(b, x, **state), 3, 0.1, 0.1, 0.9, 0.0, 1, b.geometry())
    assert torch.equal(w, before)


def test_trainer_refuses_feedback_buffers_that_alias_parameters():
    """The reference code's tied initialisation shares storage between W and V."""
    model = nn.Sequential(
        nn.Conv2d(3, 3, 1), dtp_ext.Conv2d(3, 3, 3, padding=1), dtp_ext.Conv2d(3, 3, 3, padding=1)
    )
    model[2].feedback_weight = model[1].weight.data  # another block's forward weight
    trainer = dtp_ext.FeedbackTrainer(model, 2, 0.1, 0.1)
    model(torch.randn(2, 3, 6, 6))
    before = model[1].weight.detach().clone()
    with pytest.raises(
        ValueError,
        match=r"block '2'.s feedback_weight shares memory with the model's "
        r"parameter '1.weight'",
    ):
        trainer.step()
    assert torch.equal(model[1].weight, before)


def saturated_block(kind):
    torch.manual_seed(0)
    if kind == "elu-bias-60":  # ELU(z) = -1.0 exactly for z < -38: every window ties
        b = dtp_ext.Conv2d(2, 3, 3, padding=1, activation="elu", pool=2).double()
        with torch.no_grad():
            b.bias.fill_(-60.0)
    else:  # tanh with large weights: +-1.0 exactly in most positions
        b = dtp_ext.Conv2d(2, 3, 3, padding=1, activation="tanh", pool=2).double()
        with torch.no_grad():
            b.weight.mul_(200.0)
    return b, torch.randn(4, 2, 8, 8, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["elu-bias-60", "tanh-large-weights"])
def test_ties_after_saturation_follow_max_pool_of_phi(kind):
    b, x = saturated_block(kind)
    with torch.no_grad():
        z = dtp_ext.functional.block_forward(x, b.weight, b.bias, padding=b.numeric_padding)[0]
        h = dtp_ext.functional.activation_fn(b.activation)(z)
        windows = h.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)
        ties = (windows == windows.max(-1, keepdim=True).values).sum(-1) > 1
    assert ties.sum() > 50  # the case at hand: many tied windows
    nx, ny = torch.randn_like(x) * 0.1, torch.randn(4, 3, 4, 4, dtype=x.dtype) * 0.1
    loss, grad_v, _ = dtp_ext.functional.ldrl_loss(b, x, nx, ny)
    ref_loss, ref_grad, _ = reference.ldrl_loss_and_grads(b, x, nx, ny)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_v, ref_grad, rtol=1e-10, atol=1e-12)
    # The whole loop too (the noisy pass's indices come from the fused window max).
    torch.manual_seed(1)
    v, c, losses, _ = reference.feedback_loop(b, x, 5, 0.1, 0.01)
    torch.manual_seed(1)
    trainer = dtp_ext.FeedbackTrainer(nn.Sequential(b), 5, 0.1, 0.01, blocks=[b])
    b.train()
    b(x)
    report = trainer.step()
    torch.testing.assert_close(report.losses["0"], losses, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.feedback_weight, v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "elu", "tanh"])
def test_nan_follows_atens_rules_with_checks_off(activation):
    """With the finite checks off a NaN must propagate as in ATen (relu keeps NaN, max-pool
    takes it), never be cleaned into a number silently."""
    torch.manual_seed(0)
    b = dtp_ext.Conv2d(2, 3, 3, padding=1, activation=activation, pool=2).double()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    x[1, 0, 3, 3] = float("nan")
    nx, ny = torch.randn_like(x) * 0.1, torch.randn(2, 3, 4, 4, dtype=x.dtype) * 0.1
    with ops.finite_checks(False):
        a = ops._ops.ldrl_loss(
            x, b.weight.detach(), b.bias.detach(), b.feedback_weight, nx, ny, *b.geometry().args()
        )
    ref = reference.ldrl_loss_and_grads(b, x, nx, ny)
    assert torch.isnan(a[0]) and torch.isnan(ref[0])
    torch.testing.assert_close(a[1], ref[1], equal_nan=True, rtol=1e-10, atol=1e-12)


LONG_LOOP = textwrap.dedent("""
    import signal, sys, time, torch, dtp_ext
    # Ctrl-C's usual handler, even when started with SIGINT ignored (a background job, nohup)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    b = dtp_ext.Linear(4, 4)
    x = torch.randn(2, 4)
    state = [b.feedback_weight, b.feedback_bias, torch.zeros(4, 4), torch.zeros(4)]
    print("started", flush=True)
    start = time.monotonic()
    try:
        dtp_ext.ops.ldrl_feedback_loop(x, b.weight.detach(), b.bias.detach(), *state, 10**8, 0.1,
                                       1e-3, 0.9, 0.0, 1, b.geometry())
    except KeyboardInterrupt:
        print(f"interrupted after {time.monotonic() - start:.2f}", flush=True)
        sys.exit(3)
""")


def test_a_long_loop_stops_on_ctrl_c():
    proc = subprocess.Popen(
        [sys.executable, "-c", LONG_LOOP], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "started"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # a failure must not leave a 10**8-iteration loop running
            proc.kill()
            proc.communicate()
    # Stopped by the signal: the loop's 10**8 iterations would run far past the 30 s wait
    # (a bound on how fast, rather than whether, would fail on a loaded machine).
    assert proc.returncode == 3, err
    assert "interrupted after" in out


def test_an_interrupted_trainer_step_restores_every_block():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), dtp_ext.Linear(8, 8, activation="tanh"), dtp_ext.Linear(8, 3)
    )
    trainer = dtp_ext.FeedbackTrainer(model, iterations=[5, 10**8], noise_std=0.1, lr=1e-3)
    model(torch.randn(2, 4))
    before = [b.feedback_weight.clone() for _, b in dtp_ext.dtp_blocks(model)]
    # Ctrl-C's usual handler, even under a runner that started with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.step()
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    for a, (_, b) in zip(before, dtp_ext.dtp_blocks(model)):
        assert torch.equal(a, b.feedback_weight)
    assert trainer.steps == 0


def test_impossible_iteration_count_names_the_argument():
    b = dtp_ext.Linear(4, 4)
    state = [b.feedback_weight, b.feedback_bias, torch.zeros(4, 4), torch.zeros(4)]
    with pytest.raises(
        RuntimeError,
        match=r"dtp_ext.ldrl_feedback_loop: iterations asks for a tensor "
        r"of shape \[1000000000000\] that cannot be allocated",
    ):
        ops.ldrl_feedback_loop(
            torch.randn(2, 4),
            b.weight.detach(),
            b.bias.detach(),
            *state,
            10**12,
            0.1,
            1e-3,
            0.9,
            0.0,
            1,
            b.geometry(),
        )


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 1),
        dtp_ext.Conv2d(4, 4, 3, padding=1, activation="elu", pool=2),
        nn.Flatten(),
        dtp_ext.Linear(16, 3),
    )


@pytest.mark.parametrize("budget", [float("inf"), float("nan"), 0, -1, "256"])
def test_memory_budget_must_be_finite(budget):
    with pytest.raises(ValueError, match="memory_budget_mb must be a finite number > 0"):
        dtp_ext.FeedbackTrainer(small_model(), 1, 0.1, 0.1, memory_budget_mb=budget)


@pytest.mark.parametrize("budget", [1e300, 1e303, 1.7e308])
def test_huge_memory_budget_runs(budget):
    """Any finite budget works, up to the largest float (its byte count overflows float64)."""
    model = small_model()
    trainer = dtp_ext.FeedbackTrainer(model, 3, 0.1, 1e-3, memory_budget_mb=budget)
    model(torch.randn(2, 3, 4, 4))
    trainer.step()


def test_cast_after_forward_and_empty_batch_are_explained():
    model = small_model()
    trainer = dtp_ext.FeedbackTrainer(model, 1, 0.1, 0.1)
    model(torch.randn(2, 3, 4, 4))
    model.double()
    with pytest.raises(
        RuntimeError,
        match=r"block '1' recorded its input as torch.float32 on cpu, but "
        r"its weights are now torch.float64",
    ):
        trainer.step()
    model(torch.randn(0, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"block '1' recorded an empty batch"):
        trainer.step()


def test_pool_larger_than_the_map_names_the_layer():
    block = dtp_ext.Conv2d(3, 4, 3, activation="relu", pool=2)
    with pytest.raises(
        ValueError, match=r"dtp_ext.Conv2d: pool=2 is larger than the conv's output map \(1x1"
    ):
        block(torch.randn(1, 3, 3, 3))


def test_finite_explosion_is_refused_and_restored():
    model = small_model()
    trainer = dtp_ext.FeedbackTrainer(model, iterations=[3, 2], noise_std=1.0, lr=[10.0, 1e-3])
    model(torch.randn(4, 3, 4, 4))
    before = [b.feedback_weight.clone() for _, b in dtp_ext.dtp_blocks(model)]
    with pytest.raises(
        FloatingPointError,
        match=r"block '1' diverged: its feedback weight's norm grew .* times in one step",
    ):
        trainer.step()
    for a, (_, b) in zip(before, dtp_ext.dtp_blocks(model)):
        assert torch.equal(a, b.feedback_weight)
    # The same step without the bound keeps finite (huge) weights: the guard is what refused it.
    unbounded = dtp_ext.FeedbackTrainer(
        model, iterations=[3, 2], noise_std=1.0, lr=[10.0, 1e-3], max_growth=None
    )
    unbounded.step()
    assert torch.isfinite(model[1].feedback_weight).all()
    assert model[1].feedback_weight.norm() > 100 * before[0].norm()


def test_report_names_the_kernel_that_ran():
    b, x, out, idx = pooled_block()
    ops.propagate_target(
        out, idx, torch.randn_like(out), b.feedback_weight, 1.4, x.shape, b.geometry()
    )
    assert ops.last_kernel() == "dtp_ext::propagate_target[CPU]"
    ops.block_weight_grad(x, out, idx, torch.randn_like(out), b.weight, b.geometry())
    assert ops.last_kernel() == "dtp_ext::block_weight_grad[CPU]"


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


@pytest.mark.parametrize(
    "build, says",
    [
        (
            lambda m: dtp_ext.FeedbackTrainer(m, 2**63, 0.1, 1e-3),
            "iterations entries must be at most",
        ),
        (lambda m: dtp_ext.Linear(3, 2, beta=1e308), "beta must be a number in"),
    ],
    ids=["iterations", "beta"],
)
def test_finite_but_overflowing_library_settings_are_refused(build, says):
    model = nn.Sequential(dtp_ext.Linear(3, 2))
    with pytest.raises(ValueError, match=says):
        build(model)
