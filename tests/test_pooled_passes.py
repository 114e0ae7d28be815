"""The CPU's pooled elementwise passes (csrc/cpu/elementwise_cpu.cpp) against max_unpool2d and
against each other: window-owning writes in NCHW and channels-last memory, results rounded
once to bfloat16 as they are written, bfloat16 maps ranked by phi looked up in float32, and the
SGD pass that returns the loss's noise term <V, E> as it updates V."""

import pytest
import torch
import torch.nn.functional as F

from dtp_ext.functional import activation_fn

CL = torch.channels_last


def pooled_pair(size, pool, seed, dtype=torch.float32):
    """Two pooled maps with indices from two different pools of one shape (so a's and b's
    positions coincide in some windows and differ in others)."""
    gen = torch.Generator().manual_seed(seed)
    za = torch.randn(3, 5, size, size, dtype=torch.float64, generator=gen)
    zb = torch.randn(3, 5, size, size, dtype=torch.float64, generator=gen)
    a, a_idx = F.max_pool2d_with_indices(za, pool, pool)
    b, b_idx = F.max_pool2d_with_indices(zb, pool, pool)
    noise = torch.randn(a.shape, dtype=torch.float64, generator=gen)
    return a.to(dtype), noise.to(dtype), a_idx, b.to(dtype), b_idx, list(za.shape)


@pytest.mark.parametrize("size, pool", [(7, 2), (8, 3), (6, 2), (16, 2), (9, 4)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_phi_unpool_difference_equals_max_unpool(size, pool, channels_last, dtype):
    """scale * (unpool(phi(a + alpha * noise)) - unpool(phi_b)), zeros and uncovered edges
    included, bit for bit: each position is computed once as the scatter of a then b into
    zeros would (bfloat16: in float32, rounded once)."""
    a, noise, a_idx, phi_b, b_idx, shape = pooled_pair(size, pool, size * 10 + pool, dtype)
    phi_b = phi_b.float() if dtype == torch.bfloat16 else phi_b  # the clean phi is float32
    alpha, scale = 0.5, -1.75
    got = torch.ops.dtp_ext._phi_unpool_difference(
        "dtp_ext.test",
        a,
        noise,
        alpha,
        a_idx,
        phi_b,
        b_idx,
        shape,
        pool,
        "elu",
        scale,
        channels_last,
    )
    math = torch.float32 if dtype == torch.bfloat16 else dtype
    pa = F.elu(a.to(math) + alpha * noise.to(math))
    unpool = lambda t, i: F.max_unpool2d(t, i, pool, pool, output_size=shape[2:])
    expected = (unpool(scale * pa, a_idx) - unpool(scale * phi_b.to(math), b_idx)).to(dtype)
    assert got.dtype == dtype
    assert got.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    assert torch.equal(got, expected)


def saturating_map(dtype, seed=0):
    """A map whose windows hold ties of phi: ELU and tanh saturate far from 0 (different z,
    equal phi, so the first one wins), exact ties, and a NaN (it wins its window)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 8, 8, generator=gen) * 3
    z[0, 0, :2, :2] = torch.tensor([[-30.0, -40.0], [-25.0, -50.0]])  # ELU: all -1
    z[0, 1, :2, :2] = torch.tensor([[20.0, 30.0], [25.0, 12.0]])  # tanh: all 1
    z[0, 2, :2, :2] = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    z[1, 3, 2:4, 2:4] = torch.tensor([[1.0, float("nan")], [3.0, 2.0]])
    return z.to(dtype)


@pytest.mark.parametrize("activation", ["elu", "tanh", "relu", "none"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_bfloat16_noisy_difference_ranks_phi_as_the_float32_pass_does(activation, channels_last):
    """A bfloat16 map is ranked by phi of each value looked up in float32 (a table ATen's own
    activation fills): the same windows, maxima and differences as the float32 pass on the same
    values, rounded once. (512 elements: ATen's vectorised activation covers them all, as it
    covers the table, so the two are bitwise equal.)"""
    z = saturating_map(torch.bfloat16)
    if channels_last:
        z = z.contiguous(memory_format=CL)
    phi = activation_fn(activation)
    s, idx = F.max_pool2d_with_indices(phi(torch.randn(2, 4, 8, 8)), 2, 2)
    clean = phi(s)
    for c, i in ((clean, idx), (None, None)):
        got = torch.ops.dtp_ext._noisy_difference(z, c, i, activation, 2, channels_last)
        ref = torch.ops.dtp_ext._noisy_difference(z.float(), c, i, activation, 2, channels_last)
        assert got.dtype == torch.bfloat16
        assert got.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
        assert torch.equal(got.isnan(), ref.isnan())
        assert torch.equal(got.nan_to_num(0), ref.to(torch.bfloat16).nan_to_num(0))
    # Without a clean term only the winners are written: the first of a window's ties.
    ties = {"elu": [0, 2], "tanh": [1, 2], "relu": [2], "none": [2]}[activation]
    for ch in ties:
        window = got[0, ch, :2, :2].flatten()
        assert window[0] != 0 and (window[1:] == 0).all(), (ch, window)
    assert got[1, 3, 2, 3].isnan()  # the NaN won its window


def test_sgd_update_returns_the_batch_loss_for_the_v_it_read():
    """The fused SGD pass returns <V, H> - 2 <V, E> for the V it read (B times the L-DRL loss:
    <V, H> = |V.u|^2), in float64 to 1e-12 and, for float32 masters with bfloat16 pairings, in
    float32; <V, H> without a noise pairing; a channels-last state updates exactly as a
    contiguous one."""
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(8, 6, 3, 3, dtype=torch.float64, generator=gen)
    h = torch.randn(v.shape, dtype=torch.float64, generator=gen)
    e = torch.randn(v.shape, dtype=torch.float64, generator=gen)
    dot = lambda a, b: torch.dot(a.double().flatten(), b.double().flatten()).item()
    w, buf = v.clone(), torch.zeros_like(v)
    loss = torch.ops.dtp_ext._sgd_ldrl_update(w, buf, h, e, 0.25, 1e-3, 0.9, 0.1)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert abs(loss.item() - (dot(v, h) - 2 * dot(v, e))) < 1e-12 * v.numel()
    expected_buf = 0.25 * (h - e) + 1e-3 * v
    assert torch.allclose(buf, expected_buf, rtol=0, atol=1e-15)
    assert torch.allclose(w, v - 0.1 * expected_buf, rtol=0, atol=1e-15)

    # Float32 master, bfloat16 pairings in channels-last memory (the im2col route's layout).
    master = v.float()
    h16, e16 = h.to(torch.bfloat16), e.to(torch.bfloat16)
    flat_w, flat_buf = master.clone(), torch.zeros_like(master)
    flat_loss = torch.ops.dtp_ext._sgd_ldrl_update(flat_w, flat_buf, h16, e16, 0.25, 0, 0.9, 0.1)
    cl_w = master.contiguous(memory_format=CL)
    cl_buf = torch.zeros_like(cl_w)
    cl_loss = torch.ops.dtp_ext._sgd_ldrl_update(
        cl_w,
        cl_buf,
        h16.contiguous(memory_format=CL),
        e16.contiguous(memory_format=CL),
        0.25,
        0,
        0.9,
        0.1,
    )
    reference = dot(master, h16) - 2 * dot(master, e16)
    for got in (flat_loss, cl_loss):
        assert got.dtype == torch.float32
        assert abs(got.item() - reference) < 1e-6 * (abs(dot(master, h16)) + abs(dot(master, e16)))
    assert torch.equal(cl_w, flat_w) and torch.equal(cl_buf, flat_buf)
    assert cl_w.is_contiguous(memory_format=CL)

    alone = torch.ops.dtp_ext._sgd_ldrl_update(v.clone(), torch.zeros_like(v), h, None, 1, 0, 0, 1)
    assert abs(alone.item() - dot(v, h)) < 1e-12 * v.numel()


@pytest.mark.parametrize("size, pool", [(7, 2), (9, 3), (5, 5), (6, 4)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_bfloat16_noisy_difference_on_uneven_maps_and_larger_pools(size, pool, channels_last):
    """The one-pass bfloat16 noisy difference on maps that are not multiples of the pool (the
    last window of a row or column owns the uncovered edge, written as zeros) and pools other
    than 2x2: the same winners as the float32 pass and its values rounded once (within one
    bfloat16 rounding: ATen's activation may take its scalar path for a few elements here)."""
    gen = torch.Generator().manual_seed(size * 10 + pool)
    z = (torch.randn(3, 4, size, size, generator=gen) * 2).to(torch.bfloat16)
    if channels_last:
        z = z.contiguous(memory_format=CL)
    s, idx = F.max_pool2d_with_indices(F.elu(torch.randn(3, 4, size, size, generator=gen)), pool)
    clean = F.elu(s)
    got = torch.ops.dtp_ext._noisy_difference(z, clean, idx, "elu", pool, channels_last)
    ref = torch.ops.dtp_ext._noisy_difference(z.float(), clean, idx, "elu", pool, channels_last)
    assert got.shape == z.shape and got.dtype == torch.bfloat16
    assert torch.equal(got != 0, ref.to(torch.bfloat16) != 0)
    torch.testing.assert_close(got.float(), ref, rtol=2**-8, atol=1e-6)
    covered = (size // pool) * pool
    assert (got[..., covered:, :] == 0).all() and (got[..., :, covered:] == 0).all()
