"""Every fused op rejects NaN/Inf inputs, naming the op and the argument, before it writes
anything (feedback weights and momentum untouched); the check can be switched off."""

import pytest
import torch

import dtp_ext
from dtp_ext import _signatures, ops
from tests.helpers.op_args import op_calls

CASES = [(args.op, name) for args in op_calls() for name in args.floating_tensors()]


def op_call(op):
    (args,) = [a for a in op_calls() if a.op == op]
    return args


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("op,arg", CASES, ids=[f"{o}-{a}" for o, a in CASES])
def test_non_finite_input_is_rejected_naming_the_argument(op, arg, bad):
    args = op_call(op).clone()
    args[arg].view(-1)[args[arg].numel() // 2] = bad
    before = args.clone()
    with pytest.raises(
        dtp_ext.NonFiniteInputError, match=f"dtp_ext.{op}: {arg} contains non-finite values"
    ) as refused:
        args.call()
    assert isinstance(refused.value, ValueError)
    for n in args.floating_tensors():  # nothing written, in-place buffers included
        assert torch.equal(args[n], before[n]) or (n == arg and args[n].isnan().any())


def test_wrappers_and_the_dtp_backward_raise_the_same_type():
    """The type comes from the compiled op, whichever way it is called."""
    args = op_call("block_weight_grad")
    geometry = ops.BlockGeometry(*(args[n] for n in _signatures.GEOMETRY))
    delta = args["delta"].clone()
    delta.view(-1)[0] = float("nan")
    with pytest.raises(dtp_ext.NonFiniteInputError, match="block_weight_grad: delta"):
        ops.block_weight_grad(
            args["x"], args["output"], args["indices"], delta, args["weight"], geometry
        )
    layer = dtp_ext.Linear(4, 3, activation="elu").double()
    out = layer(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(dtp_ext.NonFiniteInputError):
        (out.sum() * float("nan")).backward()


def test_checks_can_be_switched_off_and_are_restored():
    args = op_call("ldrl_loss")
    args = args.replace(x=args["x"].clone())
    args["x"][0, 0, 0, 0] = float("nan")
    assert ops.finite_checks_enabled()
    with ops.finite_checks(False):
        assert not ops.finite_checks_enabled()
        loss, _, _ = args.call()
    assert loss.isnan()  # what unchecked maths does with it
    assert ops.finite_checks_enabled()


def test_valid_inputs_pass_the_checks():
    for args in op_calls():
        results = args.clone().call()
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
            dtp_ext.NonFiniteInputError,
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
