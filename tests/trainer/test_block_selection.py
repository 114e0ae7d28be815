"""Which blocks FeedbackTrainer trains: by data flow, in forward execution order (docs/maths.md §5)."""

import pytest
import torch
from torch import nn

import dtp_ext
from tests.helpers.models import HeadFirst


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


class Checkpointed(nn.Module):
    """Blocks a, b, c, d; b runs under activation checkpointing."""

    def __init__(self, use_reentrant):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.a = dtp_ext.Linear(4, 8, activation="elu")
        self.b = dtp_ext.Linear(8, 8, activation="elu")
        self.c = dtp_ext.Linear(8, 8, activation="elu")
        self.d = dtp_ext.Linear(8, 3)

    def forward(self, x):
        x = self.a(x)
        x = torch.utils.checkpoint.checkpoint(self.b, x, use_reentrant=self.use_reentrant)
        return self.d(self.c(x))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recomputation_is_not_a_forward(use_reentrant):
    """The recomputation inside backward() neither re-stamps the block (forward order stays
    b, c, d: per-block lists bind to the right blocks) nor records a new input; reentrant
    checkpointing's first pass runs without autograd, and its replay tells that b's input needs
    a target, so b is trained from the first step."""
    torch.manual_seed(0)
    model = Checkpointed(use_reentrant)
    trainer = dtp_ext.FeedbackTrainer(model, iterations=[1, 2, 3], noise_std=0.1, lr=0.01)
    x = torch.randn(5, 4)
    model(x).sum().backward()
    stamps = {n: b.forward_stamp for n, b in model.named_children()}
    assert stamps["a"] < stamps["b"] < stamps["c"] < stamps["d"]
    report = trainer.step()
    assert list(report.losses) == ["b", "c", "d"]
    assert {n: len(report.losses[n]) for n in "bcd"} == {"b": 1, "c": 2, "d": 3}
    assert model.b.recorded_input.shape == (5, 8)


def test_count_error_names_the_blocks_left_out_and_why():
    """A block whose only forward ran without autograd (torch.no_grad, or reentrant
    checkpointing before its replay) is not trained; the list-length error says which and why."""
    model = Checkpointed(use_reentrant=True)
    trainer = dtp_ext.FeedbackTrainer(model, iterations=[1, 2, 3], noise_std=0.1, lr=0.01)
    model(torch.randn(5, 4))  # forward only: b's replay in backward() has not run
    with pytest.raises(
        ValueError,
        match=r"2 DTP blocks are trained.*not trained: a: .*b: its "
        r"training forward passes ran without autograd.*reentrant",
    ):
        trainer.step()


class SharedBlock(nn.Module):
    """Block b is applied twice in one forward (weights shared across depth)."""

    def __init__(self, second_width=8):
        super().__init__()
        self.a = dtp_ext.Linear(4, 8, activation="elu")
        self.b = dtp_ext.Linear(8, 8, activation="elu")
        self.d = dtp_ext.Linear(8, 3)

    def forward(self, x):
        return self.d(self.b(self.b(self.a(x))))


def test_block_called_twice_trains_on_both_inputs():
    """A block called twice in one forward of the trainer's model trains on both inputs,
    concatenated along the batch; its forward order is its first use; the next forward pass
    starts afresh (gradient accumulation trains on the latest micro-batch)."""
    torch.manual_seed(0)
    model = SharedBlock()
    trainer = dtp_ext.FeedbackTrainer(model, iterations=[2, 3], noise_std=0.1, lr=0.01)
    x = torch.randn(5, 4)
    model(x).sum().backward()
    first = model.a(x).detach()
    expected = torch.cat([first, model.b(first).detach()])
    model(x).sum().backward()  # the pass the step trains on (the extra calls above are not)
    assert torch.equal(model.b.recorded_input, expected)
    assert model.a.forward_stamp < model.b.forward_stamp < model.d.forward_stamp
    report = trainer.step()
    assert {n: len(l) for n, l in report.losses.items()} == {"b": 2, "d": 3}

    model(x[:2]).sum().backward()  # a new forward pass: only its inputs
    assert model.b.recorded_input.shape == (4, 8)


def test_block_called_twice_matches_one_call_on_the_concatenation():
    """Feedback trained from a doubly-called block equals feedback trained from one call on
    the concatenated batch, with the same noise."""
    torch.manual_seed(0)
    shared = SharedBlock()
    single = dtp_ext.Linear(8, 8, activation="elu")
    single.load_state_dict(shared.b.state_dict())
    x = torch.randn(5, 4)
    shared(x).sum().backward()
    inputs = shared.b.recorded_input.clone()
    single.train()
    single(inputs.requires_grad_())
    settings = dict(iterations=3, noise_std=0.1, lr=0.01)
    torch.manual_seed(1)
    dtp_ext.FeedbackTrainer(shared, blocks=[shared.b], **settings).step()
    torch.manual_seed(1)
    dtp_ext.FeedbackTrainer(single, **settings).step()
    torch.testing.assert_close(shared.b.feedback_weight, single.feedback_weight)


def test_block_called_on_different_shapes_in_one_forward_is_refused():
    class TwoScales(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = dtp_ext.Conv2d(1, 4, 3, padding=1)
            self.conv = dtp_ext.Conv2d(4, 4, 3, padding=1, activation="elu")

        def forward(self, x):
            x = self.stem(x)
            return self.conv(x).mean() + self.conv(x[..., ::2, ::2]).mean()

    model = TwoScales()
    trainer = dtp_ext.FeedbackTrainer(model, iterations=1, noise_std=0.1, lr=0.01)
    model(torch.randn(2, 1, 8, 8)).backward()
    with pytest.raises(
        RuntimeError,
        match=r"called this block 2 times in one forward pass.*"
        r"\(4, 4, 4\), \(4, 8, 8\).*needs one shape",
    ):
        trainer.step()


def test_calls_outside_the_models_forward_keep_the_latest_input():
    model = SharedBlock()
    dtp_ext.FeedbackTrainer(model, iterations=1, noise_std=0.1, lr=0.01)
    model(torch.randn(5, 4))
    y = torch.randn(3, 8)
    model.b(y)
    model.b(2 * y)
    assert torch.equal(model.b.recorded_input, 2 * y)


def test_a_model_with_tracked_passes_still_pickles_and_copies():
    import copy
    import pickle

    model = SharedBlock()
    dtp_ext.FeedbackTrainer(model, iterations=1, noise_std=0.1, lr=0.01)
    clone = pickle.loads(pickle.dumps(model))
    clone(torch.randn(5, 4))
    assert clone.b.recorded_input.shape == (10, 8)
    copied = copy.deepcopy(model)
    copied(torch.randn(2, 4))
    assert copied.b.recorded_input.shape == (4, 8) and model.b.recorded_input is None


def test_an_eval_forward_keeps_the_recorded_training_inputs():
    """model.eval() records nothing, also on a model whose passes a trainer tracks."""
    torch.manual_seed(0)
    model = SharedBlock()
    trainer = dtp_ext.FeedbackTrainer(model, iterations=1, noise_std=0.1, lr=0.01)
    model(torch.randn(5, 4))
    model.eval()
    model(torch.randn(3, 4))
    model.train()
    assert model.b.recorded_input.shape == (10, 8)
    assert set(trainer.step().losses) == {"b", "d"}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_the_whole_tracked_model(use_reentrant):
    """The recomputation of a checkpointed model inside backward() neither opens a new pass
    nor drops what the forward pass recorded: step() after backward() trains."""
    torch.manual_seed(0)
    model = SharedBlock()
    trainer = dtp_ext.FeedbackTrainer(model, iterations=1, noise_std=0.1, lr=0.01)
    x = torch.randn(5, 4, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=use_reentrant)
    out.sum().backward()
    assert model.b.recorded_input.shape == (10, 8)
    assert set(trainer.step().losses) == {"a", "b", "d"}


class TwoUses(nn.Module):
    """Block a runs on the data (no target needed) and on a trainable stem's output (target
    needed), each use under its own activation checkpoint."""

    def __init__(self, use_reentrant):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.stem = dtp_ext.Linear(4, 4)
        self.a = dtp_ext.Linear(4, 4, activation="tanh")
        self.head = dtp_ext.Linear(4, 3)

    def forward(self, x):
        def run(f, *args):
            return torch.utils.checkpoint.checkpoint(f, *args, use_reentrant=self.use_reentrant)

        return self.head(run(self.a, x) + run(self.a, self.stem(x)))


def test_checkpoint_replays_only_add_that_an_input_needs_a_target():
    """Replays run in reverse order: the use on the data, replayed last, must not undo that the
    other use's input needs a target."""
    torch.manual_seed(0)
    model = TwoUses(use_reentrant=False)
    trainer = dtp_ext.FeedbackTrainer(model, iterations=1, noise_std=0.1, lr=0.01)
    model(torch.randn(6, 4)).sum().backward()
    assert model.a.input_needs_target is True
    assert set(trainer.step().losses) == {"a", "head"}


def test_a_block_on_two_shapes_left_out_does_not_stop_the_others():
    """The different-shapes refusal's advice works: with the block left out of blocks=, step()
    and explain() run (the plans count each of its calls as forward cost)."""

    class TwoScales(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = dtp_ext.Conv2d(1, 4, 3, padding=1)
            self.conv = dtp_ext.Conv2d(4, 4, 3, padding=1, activation="elu")
            self.head = dtp_ext.Linear(4, 2)

        def forward(self, x):
            x = self.stem(x)
            pooled = self.conv(x).mean((2, 3)) + self.conv(x[..., ::2, ::2]).mean((2, 3))
            return self.head(pooled)

    model = TwoScales()
    trainer = dtp_ext.FeedbackTrainer(model, blocks=["stem", "head"])
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert set(trainer.step().losses) == {"stem", "head"}
    assert "2 of 3 DTP blocks trained" in trainer.explain()


def test_nested_tracked_models_share_one_pass():
    """A trainer on the parent and one on a child: the child's calls inside the parent's
    forward belong to the parent's pass (a block called twice there keeps both inputs)."""
    parent = nn.Sequential(SharedBlock())
    dtp_ext.FeedbackTrainer(parent, iterations=1, noise_std=0.1, lr=0.01)
    dtp_ext.FeedbackTrainer(parent[0], iterations=1, noise_std=0.1, lr=0.01)

    class Twice(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + self.inner(x)

    outer = Twice(parent[0])
    dtp_ext.FeedbackTrainer(outer, iterations=1, noise_std=0.1, lr=0.01)
    outer(torch.randn(5, 4))
    assert parent[0].a.recorded_input.shape == (10, 4)  # both calls of inner: one pass
    parent[0](torch.randn(3, 4))
    assert parent[0].a.recorded_input.shape == (3, 4)  # a call of its own: a new pass
