"""The forward-step divergence guard of `dtp-ext train`: a non-finite loss or forward gradient
refuses the step (forward weights and optimizer state untouched) with a clear error. The
2-process version (one rank's gradient poisoned) is in tests/distributed/test_train_ranks.py."""

import pytest
import torch

from dtp_ext.cli import main
from dtp_ext.train import TrainingDiverged
from dtp_ext.train.algorithms.bp import Backprop
from tests.helpers.tiny_runs import first_batch, tiny_args, tiny_run


@pytest.mark.parametrize("algorithm", ["ldrl", "bp"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_refuses_the_step(tmp_path, algorithm, bad):
    run = tiny_run(tmp_path, algorithm)
    x, y = first_batch(run)
    run._train_step(x, y)  # one good step: the optimizer now has momentum
    weights = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    momentum = {
        n: run.optimizer.state[p]["momentum_buffer"].clone()
        for n, p in run.model.named_parameters()
    }
    inner = run.algorithm.train_step

    def poisoned(x, y, step):
        out = inner(x, y, step)
        run.model.fc.bias.grad[3] = bad
        return out

    run.algorithm.train_step = poisoned
    with pytest.raises(
        TrainingDiverged, match=r"forward gradient became non-finite \(fc.bias\) at step 1"
    ) as info:
        run._train_step(x, y)
    assert "refused" in str(info.value) and "lower the forward lr" in str(info.value)
    for n, p in run.model.named_parameters():
        assert torch.equal(p, weights[n]), n
        assert torch.equal(run.optimizer.state[p]["momentum_buffer"], momentum[n]), n
    assert run.global_step == 1 and run.counter.state["seen"] == 32


@pytest.mark.integration
def test_cli_stops_with_exit_code_1_and_no_checkpoint(tmp_path, capsys, monkeypatch):
    inner = Backprop.train_step

    def poisoned(self, x, y, step):
        out = inner(self, x, y, step)
        if step == 1:
            self.model.conv1.weight.grad.fill_(float("nan"))
        return out

    monkeypatch.setattr(Backprop, "train_step", poisoned)
    out = tmp_path / "r"
    assert (
        main(
            [
                "train",
                "--algorithm",
                "bp",
                *tiny_args(test=32, probe=None, eval=None),
                "--out",
                str(out),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "diverged: a forward gradient became non-finite (conv1.weight) at step 1" in err, err
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("poison", ["input", "logits"])
def test_ldrl_non_finite_forward_is_refused_by_the_fused_ops(tmp_path, poison):
    """A NaN reaching the fused ops (a recorded input in the feedback phase, or the loss in the
    DTP backward) stops the step as divergence, never writing a non-finite weight."""
    run = tiny_run(tmp_path, "ldrl")
    x, y = first_batch(run)
    run._train_step(x, y)
    state = {n: t.clone() for n, t in run.model.state_dict().items()}
    if poison == "input":
        x = x.clone()
        x[0, 0, 5, 5] = float("nan")
        match = r"training loss became nan .*block 'conv2' was not trained: .*x contains non-finite"
    else:
        run.model.fc.register_forward_hook(lambda m, i, out: out * float("nan"))
        match = r"training loss became nan .*delta contains non-finite values"
    with pytest.raises(TrainingDiverged, match=match):
        run._train_step(x, y)
    for n, t in run.model.state_dict().items():
        # With finite inputs the feedback phase ran before the backward refused the step: its
        # feedback weights are finite; forward weights are untouched in both cases.
        if poison == "input" or "feedback" not in n:
            assert torch.equal(t, state[n]), n
        assert torch.isfinite(t).all(), n
    assert run.global_step == 1
