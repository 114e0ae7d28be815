"""Adversarial inputs to the ops: pool indices outside their window, aliased in-place
arguments, saturated pools whose windows tie, NaN with the checks off, a loop too long to run
(Ctrl-C stops it) and impossible sizes."""

import copy
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import dtp_ext
from dtp_ext import ops, reference
from tests.helpers.blocks import pooled_block, saturated_block
from tests.helpers.cuda import DEVICES, require_device


def loop_args(block, x, **state):
    fw = state.get("fw", block.feedback_weight)
    fb = state.get("fb", block.feedback_bias)
    mw = state.get("mw", torch.zeros_like(block.feedback_weight))
    mb = state.get("mb", torch.zeros_like(block.feedback_bias))
    return (x, state.get("w", block.weight.detach()), block.bias.detach(), fw, fb, mw, mb)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["elu-bias-60", "tanh-large-weights"])
def test_ties_after_saturation_follow_max_pool_of_phi(kind, device):
    require_device(device)
    b, x = saturated_block(kind)
    with torch.no_grad():
        z = dtp_ext.functional.block_forward(x, b.weight, b.bias, padding=b.numeric_padding)[0]
        h = dtp_ext.functional.activation_fn(b.activation)(z)
        windows = h.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)
        ties = (windows == windows.max(-1, keepdim=True).values).sum(-1) > 1
    assert ties.sum() > 50  # the case at hand: many tied windows
    nx, ny = torch.randn_like(x) * 0.1, torch.randn(4, 3, 4, 4, dtype=x.dtype) * 0.1
    ref = reference.ldrl_loss_and_grads(b, x, nx, ny)
    on_device = copy.deepcopy(b).to(device), x.to(device), nx.to(device), ny.to(device)
    for got, expected in zip(dtp_ext.functional.ldrl_loss(*on_device), ref):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["elu-bias-60", "tanh-large-weights"])
def test_ties_after_saturation_through_the_feedback_loop(kind):
    """The whole loop too (the noisy pass's indices come from the fused window max)."""
    b, x = saturated_block(kind)
    torch.manual_seed(1)
    v, c, losses, _ = reference.feedback_loop(b, x, 5, 0.1, 0.01)
    torch.manual_seed(1)
    trainer = dtp_ext.FeedbackTrainer(nn.Sequential(b), 5, 0.1, 0.01, blocks=[b])
    b.train()
    b(x)
    report = trainer.step()
    torch.testing.assert_close(report.losses["0"], losses, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.feedback_weight, v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["relu", "elu", "tanh"])
def test_nan_follows_atens_rules_with_checks_off(activation, device):
    """With the finite checks off a NaN must propagate as in ATen (relu keeps NaN, max-pool
    takes it), never be cleaned into a number silently: on every device, as the reference."""
    require_device(device)
    torch.manual_seed(0)
    b = dtp_ext.Conv2d(2, 3, 3, padding=1, activation=activation, pool=2).double()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    x[1, 0, 3, 3] = float("nan")
    nx, ny = torch.randn_like(x) * 0.1, torch.randn(2, 3, 4, 4, dtype=x.dtype) * 0.1
    d = copy.deepcopy(b).to(device)
    with ops.finite_checks(False):
        a = ops._ops.ldrl_loss(
            x.to(device),
            d.weight.detach(),
            d.bias.detach(),
            d.feedback_weight,
            nx.to(device),
            ny.to(device),
            *d.geometry().args(),
        )
    ref = reference.ldrl_loss_and_grads(b, x, nx, ny)
    assert torch.isnan(a[0]) and torch.isnan(ref[0])
    torch.testing.assert_close(a[1].cpu(), ref[1], equal_nan=True, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(a[2]) == 0  # the bias's gradient is zero by construction


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
