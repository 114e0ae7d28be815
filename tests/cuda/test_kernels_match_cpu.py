"""CUDA kernels against the CPU kernels and the reference, float64, same explicit noise.

Skips where no GPU is visible (CI). Where one is, every test runs: a build without the CUDA
kernels, or without device code this GPU can run, fails them (whatever DTP_EXT_CUDA says),
instead of skipping to a green run.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import dtp_ext
from dtp_ext import functional, ops, reference
from tests.helpers.blocks import BLOCKS, make_block, output_shape
from tests.helpers.cuda import HAS_CUDA_KERNELS, HAS_GPU, MISSING, needs_cuda, on_cuda
from tests.helpers.op_args import block_op_args, op_calls, private_op_args


def test_cuda_kernels_present_and_runnable_on_this_gpu():
    if not HAS_GPU:
        reason = "no GPU visible"
        if os.environ.get("DTP_EXT_CUDA") == "1":
            reason += " (DTP_EXT_CUDA=1: the build is checked by tests/packaging/test_built_library.py; these tests need a GPU)"
        pytest.skip(reason)
    info = dtp_ext.build_info()
    assert HAS_CUDA_KERNELS, MISSING
    assert info["cuda_kernels"] == list(ops.OP_NAMES)
    assert info["cuda_device_image"], (
        f"the build's device code ({info['cuda_arch_list']}) has no kernel image for this GPU "
        f"(compute capability {info['cuda_device_capability']}): rebuild with "
        f"TORCH_CUDA_ARCH_LIST={info['cuda_device_capability']}"
    )


pytestmark = [pytest.mark.cuda]


@needs_cuda
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_cuda_loss_equals_cpu_and_reference(name):
    block, x = make_block(name)
    noise_x = torch.randn(reference.block_input(block, x).shape, dtype=x.dtype) * 0.3
    noise_y = torch.randn(output_shape(block, x), dtype=x.dtype) * 0.3
    cpu = functional.ldrl_loss(block, x, noise_x, noise_y)
    ref = reference.ldrl_loss_and_grads(block, x, noise_x, noise_y)
    gpu = functional.ldrl_loss(*on_cuda(block, x, noise_x, noise_y))
    for g, c, r in zip(gpu, cpu, ref):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(g.cpu(), r, rtol=1e-9, atol=1e-11)


@needs_cuda
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_cuda_feedback_loop_targets_and_weight_grads_equal_cpu(name):
    block, x = make_block(name)
    xin = reference.block_input(block, x)
    k = 4
    nx = torch.randn(k, *xin.shape, dtype=x.dtype) * 0.2
    ny = torch.randn(k, *output_shape(block, x), dtype=x.dtype) * 0.2
    gblock, gx, gnx, gny = on_cuda(block, xin, nx, ny)
    results = []
    for b, xi, n1, n2 in ((block, xin, nx, ny), (gblock, gx, gnx, gny)):
        buffers = (torch.zeros_like(b.feedback_weight), torch.zeros_like(b.feedback_bias))
        losses = ops.ldrl_feedback_loop(
            xi,
            b.weight.detach(),
            None if b.bias is None else b.bias.detach(),
            b.feedback_weight,
            b.feedback_bias,
            *buffers,
            k,
            0.2,
            0.05,
            0.9,
            1e-3,
            2,
            b.geometry(),
            n1,
            n2,
        )
        s, idx, _ = reference.forward_block(b, xi)
        s = s.detach()
        delta = torch.linspace(-1, 1, s.numel(), dtype=x.dtype, device=s.device).reshape(s.shape)
        keep = s if b.activation or b.pool else None
        target = ops.propagate_target(
            keep, idx, delta, b.feedback_weight, 0.7 * xi.shape[0], xi.shape, b.geometry()
        )
        grads = ops.block_weight_grad(xi, keep, idx, delta, b.weight.detach(), b.geometry())
        results.append([losses, b.feedback_weight, b.feedback_bias, target, *grads])
    for c, g in zip(*results):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-9, atol=1e-10)


@needs_cuda
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_cuda_reconstruction_loop_equals_cpu(name):
    block, x = make_block(name)
    xin = reference.block_input(block, x)
    noise = torch.randn(3, *xin.shape, dtype=x.dtype) * 0.2
    gblock, gx, gnoise = on_cuda(block, xin, noise)
    results = []
    for b, xi, n in ((block, xin, noise), (gblock, gx, gnoise)):
        buffers = (torch.zeros_like(b.feedback_weight), torch.zeros_like(b.feedback_bias))
        losses = ops.reconstruction_feedback_loop(
            xi,
            b.weight.detach(),
            None if b.bias is None else b.bias.detach(),
            b.feedback_weight,
            b.feedback_bias,
            *buffers,
            3,
            0.2,
            0.01,
            0.9,
            1e-3,
            2,
            b.geometry(),
            n,
        )
        results.append([losses, b.feedback_weight, b.feedback_bias, *buffers])
    for c, g in zip(*results):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-9, atol=1e-10)


@needs_cuda
def test_cuda_simplevgg_training_step_agrees_with_cpu():
    from dtp_ext.models import simple_vgg

    torch.manual_seed(0)
    model = simple_vgg(widths=(8, 8, 16, 16, 32)).double()
    gmodel = copy.deepcopy(model).cuda()
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    its = [3, 3, 4, 5, 3]
    noise = {}
    with torch.no_grad():
        model(x)
    for name, b in dtp_ext.dtp_blocks(model)[1:]:
        xi = b.recorded_input
        ys = reference.forward_block(b, reference.block_input(b, xi))[0].shape
        k = its[len(noise)]
        noise[name] = (
            torch.randn(k, *reference.block_input(b, xi).shape, dtype=x.dtype) * 0.1,
            torch.randn(k, *ys, dtype=x.dtype) * 0.1,
        )
    states = []
    for m, dev in ((model, "cpu"), (gmodel, "cuda")):
        trainer = dtp_ext.FeedbackTrainer(
            m, iterations=its, noise_std=0.1, lr=[1e-3, 1e-3, 1e-2, 1e-2, 0.1]
        )
        opt = torch.optim.SGD(m.parameters(), lr=0.035, momentum=0.9, weight_decay=1e-4)
        out = m(x.to(dev))
        report = trainer.step(noise={n: (a.to(dev), b.to(dev)) for n, (a, b) in noise.items()})
        F.cross_entropy(out, y.to(dev)).backward()
        opt.step()
        states.append({k: v.cpu() for k, v in m.state_dict().items()})
        assert set(report.kernels.values()) == {f"dtp_ext::ldrl_feedback_loop[{dev.upper()}]"}
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-8, atol=1e-10, msg=k)


@needs_cuda
def test_cuda_ops_reject_non_finite_inputs_and_cpu_tensors():
    for args in op_calls("cuda"):
        op = args.op
        args.clone().call()  # valid inputs pass
        for name in args.floating_tensors():
            bad = args.clone()
            bad[name].view(-1)[0] = float("nan")
            with pytest.raises(
                ValueError, match=f"dtp_ext.{op}: {name} contains non-finite values"
            ):
                bad.call()
            if name not in ("x", "delta"):  # a CPU tensor among CUDA ones is named too
                mixed = args.clone().replace(**{name: args[name].cpu()})
                with pytest.raises(RuntimeError, match=f"dtp_ext.{op}: {name} must be on cuda"):
                    mixed.call()


@needs_cuda
@pytest.mark.parametrize(
    "name", ["conv-elu-pool2", "linear-tanh", "conv-elu-pool2-large", "conv-small-map"]
)
@pytest.mark.parametrize("op", ops.OP_NAMES)
def test_cuda_opcheck_every_op(name, op):
    args = block_op_args(name, k=2)[op].map(torch.Tensor.cuda)
    torch.library.opcheck(getattr(torch.ops.dtp_ext, op).default, args.positional())


@needs_cuda
@pytest.mark.parametrize("pool", [0, 2])
@pytest.mark.parametrize("op", ops.PRIVATE_OP_NAMES)
def test_cuda_private_elementwise_ops_opcheck_and_match_the_cpu(op, pool):
    """Each elementwise pass's CUDA kernel passes opcheck and computes what the CPU kernel does
    (the per-element maths is one header), the in-place SGD step included."""
    assert ops.has_kernel(op, "CUDA")

    def args(device):
        return private_op_args(pool)[op].map(lambda t: t.to(device))

    torch.library.opcheck(getattr(torch.ops.dtp_ext, op).default, args("cuda").positional())
    cpu_args, cuda_args = args("cpu"), args("cuda")
    cpu_out = cpu_args.call()
    cuda_out = cuda_args.call()
    if op == "_sgd_momentum_update":  # in place: the weight and momentum buffer
        cpu_out, cuda_out = ([a["weight"], a["momentum_buffer"]] for a in (cpu_args, cuda_args))
    for c, g in zip(
        cpu_out if isinstance(cpu_out, list) else [cpu_out],
        cuda_out if isinstance(cuda_out, list) else [cuda_out],
    ):
        torch.testing.assert_close(g.cpu(), c)


@needs_cuda
def test_cuda_bad_pool_index_is_a_device_side_assert():
    """Run in a fresh process: a device-side assert leaves that process's CUDA context unusable."""
    import subprocess
    import sys

    code = (
        "import torch, dtp_ext\n"
        "b = dtp_ext.Conv2d(3, 4, 3, padding=1, activation='relu', pool=2).cuda()\n"
        "x = torch.randn(2, 3, 8, 8, device='cuda')\n"
        "out, idx = b.forward_with_indices(x)\n"
        "idx = idx.clone(); idx.view(-1)[0] = 10**9\n"
        "g = dtp_ext.ops.propagate_target(out.detach(), idx, torch.randn_like(out), b.feedback_weight, 1.4, x.shape, b.geometry())\n"
        "torch.cuda.synchronize()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "device-side assert" in done.stderr or "pool indices outside" in done.stderr
