"""Mixed precision: every fused op in bfloat16 against the float64 autograd
reference, evaluated on the same bfloat16-rounded inputs and noise, on the 12 block shapes.

Tolerances. bfloat16 keeps 8 significant bits: rounding to nearest has a unit roundoff of
u = 2^-9 ~ 0.002. The ops round each product's output once (oneDNN accumulates in float32),
run their elementwise passes in float32 and round the result once, and the operand of a
second product (u = phi(unpool(y + eta)) - phi(unpool(y)), or the target difference) is
rounded once more before it enters it. Errors of independent roundings add in quadrature, so a
result of one product is off by about u relative to its norm, and the L-DRL quantities (two
products in sequence, and the difference H - E of two pairings) by a few u. Bounds, and the
worst error measured over the 12 blocks (seed 0) when they were set:
  propagate_target, block_weight_grad: 8u (measured 1.2u and 1.8u);
  ldrl_loss, both loops: 20u (measured 9.0u for the gradient on the 2x2 map, 5.1u for a
  loop's steps with float32 masters, 2.9u for the reconstruction loop).
Any real mistake (a wrong sign, index, scale or a dropped term) is an O(1) relative error.
The gradient H - E and the loss -2<V, E> + |Vu|^2 nearly cancel once V approaches W^T, so
their errors are measured relative to the size of the two terms, which the roundings scale
with.
"""

import sys

import pytest
import torch

from dtp_ext import ops, reference
from tests.helpers.blocks import make_block
from tests.helpers.cuda import HAS_CUDA_KERNELS, HAS_GPU, MISSING

BF16 = torch.bfloat16
LOW = BF16  # the dtype under test (test_float16_on_the_cpu sets float16)


def tol(units):
    """`units` unit roundoffs of the dtype under test: 2^-9 for bfloat16, 2^-12 for float16
    (bounds: 8 for one product, 20 for the L-DRL terms and loops; see the docstring)."""
    return units * (2.0**-9 if LOW == BF16 else 2.0**-12)


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")]
        ),
    ]
)
def device(request):
    """Every test runs on the CPU, and on CUDA where there is a GPU (the CUDA twins)."""
    if request.param == "cuda" and not HAS_CUDA_KERNELS:
        pytest.fail(MISSING)
    return request.param


def rounded(t):
    """t rounded to bfloat16, back in float64: the reference sees exactly what the op sees."""
    return None if t is None else t.to(LOW).double()


def rel(got, expected, scale=None):
    scale = expected.norm() if scale is None else scale
    return ((got.detach().cpu().double() - expected).norm() / scale).item()


def rounded_block(name, seed=0):
    """A float64 block whose parameters and input are bfloat16 values."""
    block, x = make_block(name, seed=seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(rounded(p))
        block.feedback_weight.copy_(rounded(block.feedback_weight))
        block.feedback_bias.copy_(rounded(block.feedback_bias))
    return block, rounded(reference.block_input(block, x))


def low(t, dtype=None, device="cpu"):
    return None if t is None else t.detach().to(device=device, dtype=dtype or LOW)


def on(t, device):
    return None if t is None else t.to(device)


def stored_output(block, s):
    return s if block.activation or block.pool else None


def test_propagate_target_bfloat16(block_name, device):
    block, x = rounded_block(block_name)
    s, idx, pre = reference.forward_block(block, x)
    s = rounded(s.detach())
    delta = rounded(torch.randn(s.shape, dtype=torch.float64))
    scale = 0.7 * x.shape[0]
    got = ops.propagate_target(
        low(stored_output(block, s), device=device),
        on(idx, device),
        low(delta, device=device),
        low(block.feedback_weight, device=device),
        scale,
        x.shape,
        block.geometry(),
    )
    assert got.dtype == LOW
    g_s = reference.feedback_block(block, s, idx, pre, x.shape)
    g_t = reference.feedback_block(block, s - scale * delta, idx, pre, x.shape)
    assert rel(got, (g_s - g_t).detach() / scale) < tol(8)


def test_block_weight_grad_bfloat16(block_name, device):
    block, x = rounded_block(block_name)
    s, idx, _ = reference.forward_block(block, x)
    delta = rounded(torch.randn(s.shape, dtype=torch.float64))
    params = [block.weight] + ([block.bias] if block.bias is not None else [])
    expected = torch.autograd.grad(s, params, delta)
    gw, gb = ops.block_weight_grad(
        low(x, device=device),
        low(stored_output(block, s), device=device),
        on(idx, device),
        low(delta, device=device),
        low(block.weight, device=device),
        block.geometry(),
    )
    assert gw.dtype == LOW and gb.dtype == LOW
    assert rel(gw, expected[0]) < tol(8)
    if block.bias is not None:
        assert rel(gb, expected[1]) < tol(8)


# -- L-DRL: the pool's choice is a discrete decision on rounded values --------------------
# Max-pool picks the first maximum of phi(z) in each window. z = op(x + eps) rounded to
# bfloat16 can reorder entries that float64 keeps apart by less than a rounding (ELU and tanh
# saturate, so far-negative entries are that close), and one moved index changes a and u by
# O(1) at two positions: no tolerance can absorb that. The reference below therefore takes the
# pool indices from the bfloat16 forward passes, as the op does (the clean pass pools
# phi(z) rounded to bfloat16, as at::elu returns it; the noisy pass pools phi(z) in float32
# registers), and everything else from float64 maths on the same rounded inputs.
def bf16_indices(block, x, noisy_float32, device):
    if not block.pool:
        return None
    z = op(
        block,
        low(x, device=device),
        low(block.weight, device=device),
        low(block.bias, device=device),
    )
    phi = reference_phi(block)
    h = phi(z.float()) if noisy_float32 else phi(z)
    return torch.nn.functional.max_pool2d(h, block.pool, block.pool, return_indices=True)[1].cpu()


def reference_phi(block):
    from dtp_ext.functional import activation_fn

    return activation_fn(block.activation)


def op(block, x, weight, bias):
    """The block's linear part alone, op(x)."""
    from dtp_ext.functional import block_forward

    return block_forward(
        x, weight, bias, **dict(block.functional_kwargs(), activation=None, pool=None)
    )[0]


def pooled_at(block, x, idx):
    """pool(phi(op(x))) in float64, at the given pool indices."""
    h = reference_phi(block)(op(block, x, block.weight, block.bias))
    if idx is None:
        return h, h.shape
    return h.flatten(2).gather(2, idx.flatten(2)).view(idx.shape), h.shape


def ldrl_loss_with_indices(block, x, nx, ny, V, device):
    """reference.ldrl_loss (docs/maths.md §2), pool indices from the bfloat16 passes on `device`."""
    idx = bf16_indices(block, x, False, device)
    idx_noisy = bf16_indices(block, x + nx, True, device)
    with torch.no_grad():
        y, pre = pooled_at(block, x, idx)
        y_noisy, _ = pooled_at(block, x + nx, idx_noisy)
    G = lambda t, i: reference.feedback_block(block, t, i, pre, x.shape, V, block.feedback_bias)
    r = G(y, idx)
    noise_term = -2 * (nx * (G(y_noisy, idx_noisy) - r)).flatten(1).sum(1).mean()
    reconstruction = ((G(y + ny.reshape(y.shape), idx) - r) ** 2).flatten(1).sum(1).mean()
    return noise_term, reconstruction


def test_ldrl_loss_bfloat16(block_name, device):
    block, x = rounded_block(block_name)
    s = reference.forward_block(block, x)[0]
    nx = rounded(torch.randn_like(x) * 0.1)
    ny = rounded(torch.randn(s.shape, dtype=torch.float64) * 0.1)
    loss, gv, gc = ops.ldrl_loss(
        *[
            low(t, device=device)
            for t in (x, block.weight, block.bias, block.feedback_weight, nx, ny)
        ],
        block.geometry(),
    )
    assert loss.dtype == torch.float32  # a reduction: float32
    assert gv.dtype == LOW
    V = block.feedback_weight.detach().clone().requires_grad_(True)
    noise_term, reconstruction = ldrl_loss_with_indices(block, x, nx, ny, V, device)
    g_e = torch.autograd.grad(noise_term, V, retain_graph=True)[0]  # -2 E / B
    g_h = torch.autograd.grad(reconstruction, V)[0]  # 2 H / B
    expected = (noise_term + reconstruction).item()
    # Relative to the size of the two terms (they partly cancel in the loss and in H - E).
    assert abs(loss.item() - expected) < tol(20) * (
        abs(noise_term.item()) + abs(reconstruction.item())
    )
    assert rel(gv, g_e + g_h, scale=g_e.norm() + g_h.norm()) < tol(20)
    assert gc.abs().max().item() == 0.0


@pytest.mark.parametrize("masters", [True, False], ids=["float32-masters", "bfloat16-state"])
def test_ldrl_feedback_loop_bfloat16(block_name, masters, device):
    block, x = rounded_block(block_name)
    s = reference.forward_block(block, x)[0]
    # A bfloat16 V (no masters) rounds each step into V: a larger step keeps it visible.
    k, sigma, lr, mu = 3, 0.1, 0.05 if masters else 0.5, 0.9
    nx = rounded(torch.randn(k, *x.shape, dtype=torch.float64) * sigma)
    ny = rounded(torch.randn(k, *s.shape, dtype=torch.float64) * sigma)
    V0 = block.feedback_weight.detach().clone()
    # torch.optim.SGD on the reference loss with the bfloat16 passes' pool indices. The noisy
    # indices do not depend on V; the reference keeps V in float64, as a float32 master does.
    V = V0.clone().requires_grad_(True)
    opt = torch.optim.SGD([V], lr=lr, momentum=mu)
    ref_losses = []
    for i in range(k):
        loss = sum(ldrl_loss_with_indices(block, x, nx[i], ny[i], V, device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.detach())
    ref_losses = torch.stack(ref_losses)
    state_dtype = torch.float32 if masters else LOW
    fw = low(V0, state_dtype, device).clone()
    fb = low(block.feedback_bias, state_dtype, device).clone()
    mw, mb = torch.zeros_like(fw), torch.zeros_like(fb)
    x_, w_, b_, nx_, ny_ = [low(t, device=device) for t in (x, block.weight, block.bias, nx, ny)]
    losses = ops.ldrl_feedback_loop(
        x_, w_, b_, fw, fb, mw, mb, k, sigma, lr, mu, 0.0, 2, block.geometry(), nx_, ny_
    )
    assert losses.dtype == torch.float32 and fw.dtype == state_dtype and mw.dtype == state_dtype
    if masters:
        # What the loop changed, against what the reference changed: the steps carry the error.
        assert rel(fw.cpu().double() - V0, V.detach() - V0) < tol(20)
    else:
        # A bfloat16 V rounds every step into V (|V| >> a step): only V itself is within the bound.
        assert rel(fw, V.detach()) < tol(20)
        # ... and the steps were taken: V moved by far more than its distance to the reference.
        assert rel(fw, V.detach()) < 0.25 * rel(V0, V.detach())
    assert rel(losses, ref_losses, scale=ref_losses.abs().sum()) < tol(20)


def reconstruction_loss_with_indices(block, x, eps, V, c, device):
    """Vanilla DTP's loss mean_b sum (G(F(x + eps)) - (x + eps))^2 (docs/maths.md §10), G unpooling with
    the noisy pass's indices, taken from the bfloat16 pass as the op does (see above)."""
    idx = bf16_indices(block, x + eps, True, device)
    with torch.no_grad():
        y, pre = pooled_at(block, x + eps, idx)
    r = reference.feedback_block(block, y, idx, pre, x.shape, V, c)
    return ((r - (x + eps)) ** 2).flatten(1).sum(1).mean()


def test_reconstruction_feedback_loop_bfloat16(block_name, device):
    block, x = rounded_block(block_name)
    k = 3
    noise = rounded(torch.randn(k, *x.shape, dtype=torch.float64) * 0.1)
    V0 = block.feedback_weight.detach().clone()
    c0 = block.feedback_bias.detach().clone()
    V, c = V0.clone().requires_grad_(True), c0.clone().requires_grad_(True)
    opt = torch.optim.SGD([V, c], lr=0.01, momentum=0.9)
    ref_losses = []
    for eps in noise:
        loss = reconstruction_loss_with_indices(block, x, eps, V, c, device)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.detach())
    ref_losses, V, c = torch.stack(ref_losses), V.detach(), c.detach()
    fw, fb = V0.to(device, torch.float32), c0.to(device, torch.float32)
    mw, mb = torch.zeros_like(fw), torch.zeros_like(fb)
    x_, w_, b_, noise_ = [low(t, device=device) for t in (x, block.weight, block.bias, noise)]
    losses = ops.reconstruction_feedback_loop(
        x_, w_, b_, fw, fb, mw, mb, k, 0.1, 0.01, 0.9, 0.0, 2, block.geometry(), noise_
    )
    assert losses.dtype == torch.float32
    assert rel(fw.cpu().double() - V0, V - V0) < tol(20)
    assert rel(fb.cpu().double() - c0, c - c0) < tol(20)
    assert rel(losses, ref_losses) < tol(20)


def test_bfloat16_ops_refuse_other_dtypes_naming_the_op():
    block, x = rounded_block("conv-elu-pool2")
    s = reference.forward_block(block, x)[0]
    with pytest.raises(
        RuntimeError,
        match="dtp_ext.ldrl_loss: x must be float32, float64, bfloat16 or float16, got Int",
    ):
        ops.ldrl_loss(
            x.int(),
            block.weight.detach(),
            block.bias.detach(),
            block.feedback_weight,
            x,
            s.detach(),
            block.geometry(),
        )
    with pytest.raises(
        RuntimeError,
        match="dtp_ext.ldrl_loss: feedback_weight must have dtype BFloat16 like x, got Float",
    ):
        ops.ldrl_loss(
            low(x),
            low(block.weight),
            low(block.bias),
            block.feedback_weight.float(),
            low(x),
            low(s),
            block.geometry(),
        )


def test_generator_noise_in_bfloat16_is_the_float32_stream_rounded():
    """A seed gives a bfloat16 loop the noise of a float32 run, rounded: the loop drawing its
    own noise equals the loop given round(randn * sigma) drawn eps then eta per iteration."""
    block, x = rounded_block("conv-elu-pool2")
    s = reference.forward_block(block, x)[0]
    k, sigma = 3, 0.2
    torch.manual_seed(7)
    draws = [(torch.randn(x.shape) * sigma, torch.randn(s.shape) * sigma) for _ in range(k)]
    nx = torch.stack([d[0] for d in draws]).to(BF16)
    ny = torch.stack([d[1] for d in draws]).to(BF16)
    results = []
    for noise in ((None, None), (nx, ny)):
        fw, fb = block.feedback_weight.float().clone(), block.feedback_bias.float().clone()
        mw, mb = torch.zeros_like(fw), torch.zeros_like(fb)
        torch.manual_seed(7)
        losses = ops.ldrl_feedback_loop(
            low(x),
            low(block.weight),
            low(block.bias),
            fw,
            fb,
            mw,
            mb,
            k,
            sigma,
            0.05,
            0.9,
            0.0,
            2,
            block.geometry(),
            *noise,
        )
        results.append((losses, fw))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize(
    "test",
    [
        test_propagate_target_bfloat16,
        test_block_weight_grad_bfloat16,
        test_ldrl_loss_bfloat16,
        test_reconstruction_feedback_loop_bfloat16,
    ],
    ids=lambda t: t.__name__[5:-9],
)
def test_float16_on_the_cpu(block_name, test, monkeypatch):
    """float16 on the CPU, where ATen's convolutions and matmuls run it (torch 2.14.1): the
    bfloat16 tests with float16 inputs, bounds in float16's unit roundoff 2^-12 (measured worst
    over the 12 blocks: 1.4u targets, 2.1u weight gradients, 9.3u the L-DRL gradient, 1.9u the
    reconstruction loop)."""
    monkeypatch.setattr(sys.modules[__name__], "LOW", torch.float16)
    test(block_name, "cpu")
