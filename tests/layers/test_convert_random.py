"""dtp_ext.convert and the random stream: converting draws nothing from torch's global
generator (a seeded script's dropout masks, noise and data order are the same with or without
convert), the same seed converts to the same feedback weights, an explicit generator is the
one drawn from, and the feedback weights keep the distribution of a new block's."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtp_ext


def net():
    """Linear, Conv2d, a nested container and a foldable activation."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.Dropout(0.5)),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 16),
        nn.Tanh(),
        nn.Linear(16, 4, bias=False),
    )


def feedback(model):
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.endswith(("feedback_weight", "feedback_bias"))
    }


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"fold": True}, {"inplace": True}, {"generator": torch.Generator().manual_seed(1)}],
)
def test_convert_leaves_the_global_rng_state_unchanged(kwargs):
    torch.manual_seed(0)
    model, layer = net(), nn.Linear(3, 2)
    before = torch.get_rng_state()
    converted = dtp_ext.convert(model, **kwargs)
    assert len(dtp_ext.dtp_blocks(converted)) == 4
    assert torch.equal(torch.get_rng_state(), before)
    assert isinstance(dtp_ext.convert(layer, **kwargs), dtp_ext.Linear)  # the whole model
    assert torch.equal(torch.get_rng_state(), before)


def seeded_script(convert: bool):
    """A user's seeded script: model, (convert), shuffled loader, a dropout forward, the loss;
    then whatever the global generator draws next."""
    torch.manual_seed(0)
    model = net()
    if convert:
        model = dtp_ext.convert(model)
    data = torch.utils.data.TensorDataset(torch.randn(12, 3, 8, 8), torch.randint(0, 4, (12,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    x, y = next(iter(loader))
    loss = F.cross_entropy(model(x), y)  # train mode: the Dropout draws a mask
    return x, loss.detach(), torch.rand(5)


def test_a_seeded_script_draws_the_same_with_or_without_convert():
    x_plain, loss_plain, next_plain = seeded_script(convert=False)
    x_dtp, loss_dtp, next_dtp = seeded_script(convert=True)
    assert torch.equal(x_dtp, x_plain)  # the same shuffled order
    assert torch.equal(loss_dtp, loss_plain)  # the same dropout mask (outputs equal torch.nn's)
    assert torch.equal(next_dtp, next_plain)


def test_the_same_seed_converts_to_the_same_feedback_weights():
    torch.manual_seed(0)
    a = feedback(dtp_ext.convert(net()))
    torch.rand(100)  # the global stream moved on: no effect on the default generators
    b = feedback(dtp_ext.convert(net()))
    torch.manual_seed(0)
    c = feedback(dtp_ext.convert(net()))
    torch.manual_seed(1)
    d = feedback(dtp_ext.convert(net()))
    assert a.keys() == b.keys() == c.keys() == d.keys() and len(a) == 8
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
        assert not torch.equal(a[k], d[k]), k
    # blocks of equal shape draw apart (each block's generator has its name in its seed)
    torch.manual_seed(0)
    twins = dtp_ext.convert(nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5)))
    assert not torch.equal(twins[0].feedback_weight, twins[1].feedback_weight)


def expected_draws(model, generator):
    """The feedback weights of `model`'s blocks drawn from `generator` block after block, with
    torch.nn's default layer init (weight, then bias): nn.Linear(out, in)'s for a Linear's
    (in, out) feedback weight, nn.ConvTranspose2d's for a Conv2d's."""
    out = {}
    for name, block in dtp_ext.dtp_blocks(model):
        weight = torch.empty(block.feedback_weight.shape, dtype=block.feedback_weight.dtype)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        fan_in = nn.init._calculate_fan_in_and_fan_out(weight)[0]
        bias = torch.empty(block.feedback_bias.shape, dtype=block.feedback_bias.dtype)
        nn.init.uniform_(bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=generator)
        out[f"{name}.feedback_weight"], out[f"{name}.feedback_bias"] = weight, bias
    return out


def test_an_explicit_generator_is_drawn_from_block_after_block():
    torch.manual_seed(0)
    model = net()
    converted, report = dtp_ext.convert(
        model, generator=torch.Generator().manual_seed(7), return_report=True
    )
    assert [n for n, _ in dtp_ext.dtp_blocks(converted)] == [n for n, _, _ in report.converted]
    expected = expected_draws(converted, torch.Generator().manual_seed(7))
    got = feedback(converted)
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k]), k
    other = feedback(dtp_ext.convert(model, generator=torch.Generator().manual_seed(8)))
    assert not any(torch.equal(other[k], got[k]) for k in got)
    default = feedback(dtp_ext.convert(model))
    assert not any(torch.equal(default[k], got[k]) for k in got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_generator_draws_what_the_global_generator_draws(dtype):
    """The source of randomness changes, not the distribution: seeded alike, a block's feedback
    init from a generator equals its init from the global generator."""
    for block in (
        dtp_ext.Linear(7, 5, dtype=dtype),
        dtp_ext.Conv2d(4, 6, 3, groups=2, dtype=dtype),
    ):
        torch.manual_seed(3)
        block.reset_feedback_parameters()
        from_global = feedback(block)
        block.reset_feedback_parameters(torch.Generator().manual_seed(3))
        from_generator = feedback(block)
        for k in from_global:
            assert from_generator[k].dtype == dtype
            assert torch.equal(from_generator[k], from_global[k]), k
    # and a converted block's values lie within the default init's bounds
    torch.manual_seed(0)
    linear = dtp_ext.convert(nn.Linear(7, 5).to(dtype))
    bound = 1 / math.sqrt(5)  # kaiming_uniform_(a=sqrt(5)) of fan_in 5, and the bias's
    assert linear.feedback_weight.dtype == dtype
    assert linear.feedback_weight.abs().max() <= bound
    assert linear.feedback_bias.abs().max() <= bound


def test_generator_must_be_a_torch_generator():
    with pytest.raises(TypeError, match="convert: generator must be a torch.Generator.*int"):
        dtp_ext.convert(nn.Linear(3, 2), generator=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator.*str"):
        dtp_ext.Linear(3, 2).reset_feedback_parameters(generator="seed")


def test_a_meta_model_converts_without_draws():
    before = torch.get_rng_state()
    with torch.device("meta"):
        converted = dtp_ext.convert(net())
    assert torch.equal(torch.get_rng_state(), before)
    assert all(b.feedback_weight.is_meta for _, b in dtp_ext.dtp_blocks(converted))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_cuda_model_draws_its_feedback_from_the_cpu_generators():
    torch.manual_seed(0)
    model = net()
    cuda_before = torch.cuda.get_rng_state()
    on_gpu = feedback(dtp_ext.convert(model.cuda()))
    assert torch.equal(torch.cuda.get_rng_state(), cuda_before)
    torch.manual_seed(0)
    on_cpu = feedback(dtp_ext.convert(net()))
    for k in on_cpu:
        assert on_gpu[k].is_cuda and torch.equal(on_gpu[k].cpu(), on_cpu[k]), k


def test_the_training_command_builds_a_converted_model_deterministically():
    pytest.importorskip("torchvision")
    from dtp_ext.train.catalog import build_model
    from dtp_ext.train.distributed import seed_all

    def build():
        seed_all(0)
        model = build_model("resnet-small", 1, 28, 10, 0.7)
        return model.state_dict(), torch.rand(3)

    (a, after_a), (b, after_b) = build(), build()
    assert a.keys() == b.keys() and any(k.endswith("feedback_weight") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(after_a, after_b)
    seed_all(0)
    from dtp_ext.models import torchvision_model

    torchvision_model("resnet-small", 1, 28, 10)  # the plain network: the same global draws
    assert torch.equal(torch.rand(3), after_a)
