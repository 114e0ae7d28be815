"""Every fused op rejects NaN/Inf inputs, naming the op and the argument, before it writes
anything (feedback weights and momentum untouched); the check can be switched off."""

import pytest
import torch

import dtp_ext
from dtp_ext import ops
from test_ops import sample_args


def op_calls(device="cpu"):
    """(op name, {argument name: tensor}, call(args) -> result) for each op, valid inputs."""
    block, x, y_shape, s, idx, geo, w, b = sample_args("conv-elu-pool2")
    x = dtp_ext.reference.block_input(block, x)
    fw, fb = block.feedback_weight.clone(), block.feedback_bias.clone()
    nx, ny = torch.randn_like(x) * 0.1, torch.randn(y_shape, dtype=x.dtype) * 0.1
    delta = torch.randn(y_shape, dtype=x.dtype)
    x, w, b, fw, fb, nx, ny, delta, s, idx = (
        t.to(device) for t in (x, w, b, fw, fb, nx, ny, delta, s, idx)
    )
    d = torch.ops.dtp_ext
    k = 2
    loop_args = dict(
        x=x,
        weight=w,
        bias=b,
        feedback_weight=fw,
        feedback_bias=fb,
        momentum_weight=torch.zeros_like(fw),
        momentum_bias=torch.zeros_like(fb),
        noise_x=torch.stack([nx] * k),
        noise_y=torch.stack([ny] * k),
    )
    return [
        (
            "ldrl_loss",
            dict(x=x, weight=w, bias=b, feedback_weight=fw, noise_x=nx, noise_y=ny),
            lambda a: d.ldrl_loss(
                a["x"],
                a["weight"],
                a["bias"],
                a["feedback_weight"],
                a["noise_x"],
                a["noise_y"],
                *geo,
            ),
        ),
        (
            "ldrl_feedback_loop",
            loop_args,
            lambda a: d.ldrl_feedback_loop(
                a["x"],
                a["weight"],
                a["bias"],
                a["feedback_weight"],
                a["feedback_bias"],
                a["momentum_weight"],
                a["momentum_bias"],
                k,
                0.1,
                0.01,
                0.9,
                0.0,
                1,
                a["noise_x"],
                a["noise_y"],
                *geo,
            ),
        ),
        (
            "reconstruction_feedback_loop",
            {n: t for n, t in loop_args.items() if n != "noise_y"},
            lambda a: d.reconstruction_feedback_loop(
                a["x"],
                a["weight"],
                a["bias"],
                a["feedback_weight"],
                a["feedback_bias"],
                a["momentum_weight"],
                a["momentum_bias"],
                k,
                0.1,
                0.01,
                0.9,
                0.0,
                1,
                a["noise_x"],
                *geo,
            ),
        ),
        (
            "propagate_target",
            dict(output=s, delta=delta, feedback_weight=fw),
            lambda a: d.propagate_target(
                a["output"], idx, a["delta"], a["feedback_weight"], 1.4, list(x.shape), *geo
            ),
        ),
        (
            "block_weight_grad",
            dict(x=x, output=s, delta=delta, weight=w),
            lambda a: d.block_weight_grad(a["x"], a["output"], idx, a["delta"], a["weight"], *geo),
        ),
    ]


CASES = [(op, arg) for op, args, _ in op_calls() for arg in args]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("op,arg", CASES, ids=[f"{o}-{a}" for o, a in CASES])
def test_non_finite_input_is_rejected_naming_the_argument(op, arg, bad):
    ((_, args, call),) = [c for c in op_calls() if c[0] == op]
    args = {n: t.clone() for n, t in args.items()}
    args[arg].view(-1)[args[arg].numel() // 2] = bad
    before = {n: t.clone() for n, t in args.items()}
    with pytest.raises(ValueError, match=f"dtp_ext.{op}: {arg} contains non-finite values"):
        call(args)
    for n, t in args.items():  # nothing written, in-place buffers included
        assert torch.equal(t, before[n]) or (n == arg and t.isnan().any())


def test_checks_can_be_switched_off_and_are_restored():
    ((_, args, call),) = [c for c in op_calls() if c[0] == "ldrl_loss"]
    args = dict(args, x=args["x"].clone())
    args["x"][0, 0, 0, 0] = float("nan")
    assert ops.finite_checks_enabled()
    with ops.finite_checks(False):
        assert not ops.finite_checks_enabled()
        loss, _, _ = call(args)
    assert loss.isnan()  # what unchecked maths does with it
    assert ops.finite_checks_enabled()


def test_valid_inputs_pass_the_checks():
    for _, args, call in op_calls():
        results = call({n: t.clone() for n, t in args.items()})
        results = results if isinstance(results, tuple) else (results,)
        assert all(torch.isfinite(r).all() for r in results)


def test_non_finite_loss_stops_the_dtp_backward_with_a_clear_error():
    """A diverged forward pass must not write NaN gradients into the weights silently."""
    layer = dtp_ext.Linear(4, 3, activation="elu").double()
    out = layer(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(
        ValueError,
        match="dtp_ext.block_weight_grad: delta contains non-finite|"
        "dtp_ext.propagate_target: delta contains non-finite",
    ):
        (out.sum() * float("nan")).backward()
    assert layer.weight.grad is None


# Deferred checks: what CUDA does by default (no host synchronisation inside a step), run here
# on the CPU with deferred_finite_checks("everywhere").


def _deferred_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), dtp_ext.Linear(6, 5, activation="tanh"), dtp_ext.Linear(5, 3)
    ).double()


def test_deferred_check_refuses_a_non_finite_feedback_input_at_the_guard():
    model = _deferred_model()
    trainer = dtp_ext.FeedbackTrainer(model, 3, 0.1, 1e-3)
    x = torch.randn(4, 4, dtype=torch.float64)
    x[0, 0] = float("nan")
    model(x)
    before = [b.feedback_weight.clone() for _, b in dtp_ext.dtp_blocks(model)]
    with ops.deferred_finite_checks("everywhere"):
        with pytest.raises(
            FloatingPointError,
            match=r"dtp_ext.ldrl_feedback_loop received a non-finite "
            r"input .* \(a deferred check\)",
        ):
            trainer.step()
    for a, (_, b) in zip(before, dtp_ext.dtp_blocks(model)):
        assert torch.equal(a, b.feedback_weight)
    assert int(ops.pending_non_finite("cpu")) == 0  # read and cleared by the guard


def test_deferred_check_of_a_backward_is_reported_at_the_next_step():
    model = _deferred_model()
    trainer = dtp_ext.FeedbackTrainer(model, 3, 0.1, 1e-3)
    x = torch.randn(4, 4, dtype=torch.float64)
    with ops.deferred_finite_checks("everywhere"):
        out = model(x)
        trainer.step()
        (out.sum() * float("nan")).backward()  # no exception: the check is deferred
        model(x)
        with pytest.raises(
            FloatingPointError,
            match=r"dtp_ext.(propagate_target|block_weight_grad) received "
            r"a non-finite input .* restore them from a checkpoint",
        ):
            trainer.step()


def test_check_non_finite_reads_and_clears_the_flag():
    model = _deferred_model()
    with ops.deferred_finite_checks("everywhere"):
        (model(torch.randn(2, 4, dtype=torch.float64)).sum() * float("inf")).backward()
        with pytest.raises(
            ValueError,
            match=r"dtp_ext.(propagate_target|block_weight_grad): an input "
            r"contained non-finite values",
        ):
            ops.check_non_finite("cpu")
        ops.check_non_finite("cpu")  # cleared
    with pytest.raises(ValueError, match="where must be one of"):
        with ops.deferred_finite_checks("sometimes"):
            pass


def test_final_losses_come_from_the_step_read():
    model = _deferred_model()
    trainer = dtp_ext.FeedbackTrainer(model, 3, 0.1, 1e-3)
    model(torch.randn(4, 4, dtype=torch.float64))
    report = trainer.step()
    assert report.final_losses() == {n: float(l[-1]) for n, l in report.losses.items()}
