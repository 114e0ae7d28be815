"""Which blocks FeedbackTrainer trains: by data flow, in forward execution order (SPEC §10)."""

import pytest
import torch
from torch import nn

import dtp_ext


def stem_model():
    """A plain conv stem, then DTP blocks: block '2' is fed by something trainable."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        dtp_ext.Conv2d(16, 32, 3, padding=1, activation="elu", pool=2),
        dtp_ext.Conv2d(32, 32, 3, padding=1, activation="elu", pool=2),
        nn.Flatten(),
        dtp_ext.Linear(1568, 10),
    )


class HeadFirst(nn.Module):
    """Registers its head before its body, uses it last."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 10)
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )

    def forward(self, x):
        return self.head(self.body(x))


def names(trainer):
    return [n for n, _ in trainer.blocks]


def test_block_after_a_plain_stem_is_trained():
    torch.manual_seed(0)
    model = stem_model()
    trainer = dtp_ext.FeedbackTrainer(model, iterations=3, noise_std=0.1, lr=1e-3)
    model(torch.randn(4, 1, 28, 28))
    assert names(trainer) == ["2", "3", "5"]
    before = model[2].feedback_weight.clone()
    report = trainer.step()
    assert list(report.losses) == ["2", "3", "5"]
    assert not torch.equal(before, model[2].feedback_weight)
    # Freezing the stem: block '2' is then fed by nothing trainable and needs no target.
    model[0].requires_grad_(False)
    model(torch.randn(4, 1, 28, 28))
    assert names(trainer) == ["3", "5"]
    assert "  2: its input did not require grad" in trainer.explain()


@pytest.mark.parametrize(
    "first", [nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")]
)
def test_converted_model_starting_with_a_plain_module(first):
    model = dtp_ext.convert(nn.Sequential(first, nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))
    trainer = dtp_ext.FeedbackTrainer(model, iterations=1, noise_std=0.1, lr=1e-3)
    model(torch.randn(2, 3, 8, 8))
    assert names(trainer) == ["1", "3"]


def test_head_registered_first_is_trained_and_lists_follow_forward_order():
    torch.manual_seed(0)
    model = dtp_ext.convert(HeadFirst())
    assert [n for n, _ in dtp_ext.dtp_blocks(model)] == ["head", "body.0", "body.2"]  # registration
    trainer = dtp_ext.FeedbackTrainer(model, iterations=[0, 4], noise_std=0.1, lr=[0.5, 0.02])
    model(torch.randn(8, 1, 8, 8))
    assert names(trainer) == ["body.2", "head"]
    explained = trainer.explain()
    assert "1. body.2 (Conv2d): iterations 0, noise_std 0.1, lr 0.5" in explained
    assert "2. head (Linear): iterations 4, noise_std 0.1, lr 0.02" in explained
    assert "body.0: its input did not require grad" in explained
    conv_before, head_before = (
        model.body[2].feedback_weight.clone(),
        model.head.feedback_weight.clone(),
    )
    angle_before = dtp_ext.metrics.weight_alignment(model.head)["angle"]
    for _ in range(30):
        trainer.step()
    assert torch.equal(conv_before, model.body[2].feedback_weight)  # 0 iterations, whatever its lr
    assert not torch.equal(head_before, model.head.feedback_weight)
    assert dtp_ext.metrics.weight_alignment(model.head)["angle"] < angle_before - 10


def test_list_lengths_are_checked_when_the_model_has_run():
    model = dtp_ext.convert(HeadFirst())
    model(torch.randn(2, 1, 8, 8))
    with pytest.raises(
        ValueError, match=r"lr has 3 entries, but 2 DTP blocks are trained \(\['body.2', 'head'\]"
    ):
        dtp_ext.FeedbackTrainer(model, iterations=1, noise_std=0.1, lr=[1, 2, 3])


def test_lists_bound_at_first_step_are_checked_then():
    model = dtp_ext.convert(HeadFirst())
    trainer = dtp_ext.FeedbackTrainer(model, iterations=1, noise_std=0.1, lr=[1e-3, 1e-3, 1e-3])
    model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="lr has 3 entries, but 2 DTP blocks are trained"):
        trainer.step()


def test_duplicate_blocks_are_refused():
    model = stem_model()
    with pytest.raises(ValueError, match=r"blocks lists \['3'\] more than once"):
        dtp_ext.FeedbackTrainer(model, 1, 0.1, 1e-3, blocks=["3", model[3]])


def test_explicit_blocks_keep_their_order_and_skip_the_data_flow():
    model = stem_model()
    trainer = dtp_ext.FeedbackTrainer(model, [1, 2], 0.1, 1e-3, blocks=["5", "2"])
    assert names(trainer) == ["5", "2"]
    assert "3: not in blocks=" in trainer.explain()


def test_step_before_any_forward_and_no_grad_forwards():
    model = stem_model()
    trainer = dtp_ext.FeedbackTrainer(model, 1, 0.1, 1e-3)
    assert "nothing to train yet" in trainer.explain()
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
    with pytest.raises(RuntimeError, match="no recorded forward pass with autograd on"):
        trainer.step()
    model(torch.randn(2, 1, 28, 28))
    assert names(trainer) == ["2", "3", "5"]
    # A later forward under no_grad (e.g. a feedback-only warm-up) keeps the known data flow.
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
    assert names(trainer) == ["2", "3", "5"]
    trainer.step()


def test_eval_forward_records_nothing():
    model = stem_model()
    model(torch.randn(2, 1, 28, 28))
    stamps = [b.forward_stamp for _, b in dtp_ext.dtp_blocks(model)]
    model.eval()
    model(torch.randn(2, 1, 28, 28))
    assert [b.forward_stamp for _, b in dtp_ext.dtp_blocks(model)] == stamps


def test_lists_bound_by_name_survive_a_change_of_order_and_state_dict():
    model = dtp_ext.convert(HeadFirst())
    trainer = dtp_ext.FeedbackTrainer(model, iterations=[1, 2], noise_std=0.1, lr=1e-3)
    model(torch.randn(2, 1, 8, 8))
    trainer.step()
    state = trainer.state_dict()
    assert state["blocks"] == ["body.2", "head"]
    # A fresh trainer that has not seen a forward pass takes the saved binding.
    fresh = dtp_ext.FeedbackTrainer(model, iterations=[1, 2], noise_std=0.1, lr=1e-3)
    fresh.load_state_dict(state)
    assert names(fresh) == ["body.2", "head"]
    other = dtp_ext.FeedbackTrainer(
        model, iterations=[1, 2], noise_std=0.1, lr=1e-3, blocks=["head", "body.2"]
    )
    with pytest.raises(ValueError, match=r"state is for blocks \['body.2', 'head'\]"):
        other.load_state_dict(state)


class Branches(nn.Module):
    """stem -> (left or right) -> head: forward(x, side) runs one branch."""

    def __init__(self):
        super().__init__()
        self.stem = dtp_ext.Linear(4, 6)
        self.left, self.right = dtp_ext.Linear(6, 6), dtp_ext.Linear(6, 6)
        self.head = dtp_ext.Linear(6, 3)

    def forward(self, x, side):
        h = torch.tanh(self.stem(x))
        return self.head(torch.tanh((self.left if side == "left" else self.right)(h)))


def test_a_branch_not_taken_is_not_trained_on_its_older_input():
    """A block this step's forward did not run keeps its feedback weights; explain() says why;
    several steps on one forward pass still train every block that ran in it."""
    torch.manual_seed(0)
    model = Branches()
    trainer = dtp_ext.FeedbackTrainer(model, 2, 0.1, 1e-2)
    x = torch.randn(8, 4)
    model(x, "left")
    assert {n for n, _ in trainer.step().losses.items()} == {"left", "head"}
    trainer.step()  # the same forward pass again: the same blocks
    model(x, "right")
    before = model.left.feedback_weight.clone()
    report = trainer.step()
    assert set(report.losses) == {"right", "head"}
    assert torch.equal(model.left.feedback_weight, before)
    assert "left: it did not run in the latest training forward pass" in trainer.explain()
    model(x, "left")
    assert set(trainer.step().losses) == {"left", "head"}
