"""CUDA paths the float64 NCHW agreement tests do not reach: float32, other
layouts, generator noise, concurrent streams, refused maps, grid-stride loops. They skip
without a GPU and run in benchmarks/gpu_check.sh."""

import copy

import pytest
import torch

import dtp_ext
from dtp_ext import ops, reference
from dtp_ext.models import simple_vgg
from tests.helpers.blocks import make_block, output_shape
from tests.helpers.cuda import needs_cuda, on_cuda

pytestmark = [pytest.mark.cuda]


@pytest.fixture
def no_tf32():
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@needs_cuda
@pytest.mark.parametrize(
    "name", ["conv-elu-pool2", "conv-elu-pool2-large", "linear-tanh", "conv-stride2-tanh"]
)
def test_float32_agrees_with_float64_reference_with_tf32_off(name, no_tf32):
    block, x = make_block(name, dtype=torch.float32)
    nx = torch.randn(reference.block_input(block, x).shape) * 0.3
    ny = torch.randn(output_shape(block, x)) * 0.3
    ref = reference.ldrl_loss_and_grads(
        copy.deepcopy(block).double(), x.double(), nx.double(), ny.double()
    )
    got = dtp_ext.functional.ldrl_loss(*on_cuda(block, x, nx, ny))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.cpu().double(), r, rtol=2e-4, atol=2e-5)


@needs_cuda
def test_tf32_default_is_documented():
    """cuDNN convolutions use TF32 by default in torch (matmuls do not): the float32 feedback
    loop runs its convolutions at TF32 precision unless the user turns it off."""
    assert torch.backends.cudnn.allow_tf32 is True


@needs_cuda
@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_other_input_layouts_agree(layout):
    block, x = make_block("conv-elu-pool2")
    nx = torch.randn_like(x) * 0.2
    ny = torch.randn(output_shape(block, x), dtype=x.dtype) * 0.2
    expected = dtp_ext.functional.ldrl_loss(*on_cuda(block, x, nx, ny))
    gblock, gx, gnx, gny = on_cuda(block, x, nx, ny)
    if layout == "channels_last":
        gx, gnx = (
            gx.contiguous(memory_format=torch.channels_last),
            gnx.contiguous(memory_format=torch.channels_last),
        )
    else:
        gx = torch.cat([gx, gx], dim=3)[..., ::2]  # same values, stride 2 in W
        gnx = torch.cat([gnx, gnx], dim=3)[..., ::2]
    got = dtp_ext.functional.ldrl_loss(gblock, gx, gnx, gny)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def run_loop(block, x, k, chunk, seed):
    torch.manual_seed(seed)
    state = [
        block.feedback_weight.clone(),
        block.feedback_bias.clone(),
        torch.zeros_like(block.feedback_weight),
        torch.zeros_like(block.feedback_bias),
    ]
    losses = ops.ldrl_feedback_loop(
        x,
        block.weight.detach(),
        block.bias.detach(),
        *state,
        k,
        0.1,
        1e-2,
        0.9,
        0.0,
        chunk,
        block.geometry(),
    )
    return [losses] + state


@needs_cuda
def test_generator_noise_is_independent_of_chunking_and_reproducible():
    block, x = make_block("conv-elu-pool2")
    gblock, gx = on_cuda(block, x)
    k = 6
    one = run_loop(gblock, gx, k, 1, seed=3)
    all_at_once = run_loop(gblock, gx, k, k, seed=3)
    again = run_loop(gblock, gx, k, k, seed=3)
    for a, b, c in zip(one, all_at_once, again):
        assert torch.equal(a, b) and torch.equal(b, c)


@needs_cuda
def test_concurrent_streams_equal_serial_bitwise():
    torch.manual_seed(0)
    model = simple_vgg(widths=(8, 8, 16, 16, 32)).cuda()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    results = []
    for concurrent in (True, False):
        m = copy.deepcopy(model)
        trainer = dtp_ext.FeedbackTrainer(
            m,
            iterations=[40, 40, 60, 60, 40],
            noise_std=0.1,
            lr=1e-3,
            concurrent_blocks=concurrent,
            blocks=[n for n, _ in dtp_ext.dtp_blocks(m)[1:]],
        )
        m(x)
        noise = {}
        gen = torch.Generator(device="cuda").manual_seed(1)
        for (name, b), k in zip(trainer.blocks, [40, 40, 60, 60, 40]):
            xi = reference.block_input(b, b.recorded_input)
            ys = reference.forward_block(b, xi)[0].shape
            noise[name] = (
                torch.randn(k, *xi.shape, device="cuda", generator=gen) * 0.1,
                torch.randn(k, *ys, device="cuda", generator=gen) * 0.1,
            )
        report = trainer.step(noise=noise)
        results.append(
            (
                [report.losses[n] for n in report.losses],
                [b.feedback_weight.clone() for _, b in trainer.blocks],
            )
        )
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert torch.equal(a, b)


@needs_cuda
def test_map_smaller_than_the_pool_is_refused():
    block = dtp_ext.Conv2d(3, 4, 3, activation="relu", pool=2).cuda()
    x = torch.randn(2, 3, 3, 3, device="cuda")
    state = [
        block.feedback_weight,
        block.feedback_bias,
        torch.zeros_like(block.feedback_weight),
        torch.zeros_like(block.feedback_bias),
    ]
    with pytest.raises(RuntimeError, match="the pool .* is larger than the conv's output map"):
        ops.ldrl_feedback_loop(
            x,
            block.weight.detach(),
            block.bias.detach(),
            *state,
            2,
            0.1,
            1e-3,
            0.9,
            0.0,
            1,
            block.geometry(),
        )


@needs_cuda
def test_grid_stride_loops_cover_large_tensors():
    """More elements than one grid launch covers (blocks are capped), so every kernel's
    grid-stride loop runs more than once: the result still equals the CPU."""
    torch.manual_seed(0)
    block = dtp_ext.Conv2d(4, 64, 3, padding=1, activation="elu", pool=2).double()
    x = torch.randn(
        64, 4, 64, 64, dtype=torch.float64
    )  # 4.2 M pooled elements, > 4096 x 256 threads
    nx = torch.randn_like(x) * 0.1
    ny = torch.randn(output_shape(block, x), dtype=x.dtype) * 0.1
    cpu = dtp_ext.functional.ldrl_loss(block, x, nx, ny)
    gpu = dtp_ext.functional.ldrl_loss(*on_cuda(block, x, nx, ny))
    for g, c in zip(gpu, cpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-9, atol=1e-9)


@needs_cuda
@pytest.mark.parametrize("size, pool", [(7, 2), (8, 3), (5, 5), (9, 4)])
def test_pooled_passes_write_every_output_without_a_zero_fill(size, pool):
    """The pooled CUDA passes allocate their outputs uninitialised and let each pooled element
    write its whole window, plus the edge no window covers when the map is not a multiple of
    the pool: with the allocator's cache filled with NaN first, every pass still equals the
    CPU bitwise (float64), including the uncovered rows and columns."""
    torch.manual_seed(0)
    z = torch.randn(3, 4, size, size, dtype=torch.float64)
    s, idx = torch.nn.functional.max_pool2d_with_indices(torch.tanh(z), pool, pool)
    delta = torch.randn_like(s)
    lib = torch.ops.dtp_ext

    def passes(device):
        z_, s_, idx_, delta_ = (t.to(device) for t in (z, s, idx, delta))
        shape = list(z.shape)
        return {
            "_phi_unpool_difference": lambda: lib._phi_unpool_difference(
                "dtp_ext.test",
                s_,
                delta_,
                0.5,
                idx_,
                torch.tanh(s_),
                idx_,
                shape,
                pool,
                "tanh",
                1.5,
                False,
            ),
            "_noisy_difference": lambda: lib._noisy_difference(
                z_, torch.tanh(s_), idx_, "tanh", pool, False
            ),
            "_activation_pool_backward": lambda: lib._activation_pool_backward(
                "dtp_ext.test", s_, idx_, delta_, shape, pool, "tanh"
            ),
        }

    cpu, gpu = passes("cpu"), passes("cuda")
    for name in cpu:
        for n in (z.numel(), s.numel(), 2 * z.numel()):  # freed blocks nearby hold NaN
            torch.full((n,), float("nan"), dtype=z.dtype, device="cuda")
        assert torch.equal(gpu[name]().cpu(), cpu[name]()), name
