"""The CPU's pooled elementwise passes (csrc/cpu/elementwise_cpu.cpp) against max_unpool2d and
against each other: window-owning writes in NCHW and channels-last memory, results rounded
once to bfloat16 as they are written, bfloat16 maps ranked by phi looked up in float32, and the
SGD pass that returns the loss's noise term <V, E> as it updates V."""

import pytest
import torch
import torch.nn.functional as F

from dtp_ext import ops
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
    loss = torch.ops.dtp_ext._sgd_momentum_update(w, buf, h, e, 0.25, 1e-3, 0.9, 0.1)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert abs(loss.item() - (dot(v, h) - 2 * dot(v, e))) < 1e-12 * v.numel()
    expected_buf = 0.25 * (h - e) + 1e-3 * v
    assert torch.allclose(buf, expected_buf, rtol=0, atol=1e-15)
    assert torch.allclose(w, v - 0.1 * expected_buf, rtol=0, atol=1e-15)

    # Float32 master, bfloat16 pairings in channels-last memory (the im2col route's layout).
    master = v.float()
    h16, e16 = h.to(torch.bfloat16), e.to(torch.bfloat16)
    flat_w, flat_buf = master.clone(), torch.zeros_like(master)
    flat_loss = torch.ops.dtp_ext._sgd_momentum_update(
        flat_w, flat_buf, h16, e16, 0.25, 0, 0.9, 0.1
    )
    cl_w = master.contiguous(memory_format=CL)
    cl_buf = torch.zeros_like(cl_w)
    cl_loss = torch.ops.dtp_ext._sgd_momentum_update(
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

    alone = torch.ops.dtp_ext._sgd_momentum_update(
        v.clone(), torch.zeros_like(v), h, None, 1, 0, 0, 1
    )
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


# The AVX-512 window kernels (csrc/cpu/windows_avx512.cpp) take the channels-last 2x2 windows
# of the noisy difference (bfloat16) and the scatter (float32 terms, float32 or bfloat16 out)
# where the CPU has AVX-512 F/BW/VL; they must give the scalar passes' bits.
needs_vector_kernels = pytest.mark.skipif(
    not ops.cpu_vector_kernels_enabled(), reason="this CPU lacks AVX-512 F/BW/VL"
)
VECTOR_SHAPES = [(2, 16, 8, 8), (3, 37, 7, 9), (2, 128, 16, 16), (1, 5, 5, 5), (2, 20, 2, 3)]


def hard_values(shape, seed, dtype):
    """Values with what the lanes must treat as the scalar code does: NaN (wins its window),
    +-inf, -0.0, exact ties and saturating values (ELU far below 0, tanh far above)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=gen) * 6
    flat = z.view(-1)
    picks = torch.randperm(flat.numel(), generator=gen)[: max(8, flat.numel() // 50)]
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.5, 0.5, -40, 25])
    flat[picks] = specials[torch.arange(picks.numel()) % specials.numel()]
    return z.to(dtype).contiguous(memory_format=CL)


def bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def scalar_and_vector(run):
    with ops.cpu_vector_kernels(False):
        scalar = run()
    assert ops.cpu_vector_kernels_enabled()
    return scalar, run()


@needs_vector_kernels
@pytest.mark.parametrize("shape", VECTOR_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ["elu", "tanh", "relu", "none"])
def test_vector_noisy_difference_equals_the_scalar_pass(shape, activation):
    """Channel counts that fill 16 lanes and leave a tail, maps with uncovered edges, NaN/inf/
    -0/ties in the windows, with and without the clean term: the same bits."""
    z = hard_values(shape, sum(shape), torch.bfloat16)
    s, idx = F.max_pool2d_with_indices(torch.randn(shape), 2, 2)
    clean = activation_fn(activation)(s)
    for c, i in ((clean, idx), (None, None)):
        run = lambda c=c, i=i: torch.ops.dtp_ext._noisy_difference(z, c, i, activation, 2, True)
        scalar, vector = scalar_and_vector(run)
        assert vector.is_contiguous(memory_format=CL)
        assert torch.equal(bits(vector), bits(scalar)), (shape, activation, c is None)


@needs_vector_kernels
@pytest.mark.parametrize("shape", VECTOR_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared_indices", [False, True], ids=["two-pools", "one-pool"])
def test_vector_scatter_equals_the_scalar_pass(shape, dtype, shared_indices):
    """scale * (unpool(phi(a + alpha noise)) - unpool(phi_b)) in float32 or rounded to bfloat16,
    a's and b's indices two pools or one (the targets' case), the same bits; the float32 noisy
    difference (ranked, then scattered without a second term) too."""
    gen = torch.Generator().manual_seed(sum(shape))
    a, a_idx = F.max_pool2d_with_indices(hard_values(shape, 1, torch.float32), 2, 2)
    phi_b, b_idx = F.max_pool2d_with_indices(torch.randn(shape, generator=gen), 2, 2)
    noise = torch.randn(a.shape, generator=gen)
    run = lambda: torch.ops.dtp_ext._phi_unpool_difference(
        "dtp_ext.test",
        a.to(dtype),
        noise.to(dtype),
        0.5,
        a_idx,
        phi_b,
        a_idx if shared_indices else b_idx,
        list(shape),
        2,
        "elu",
        -1.75,
        True,
    )
    scalar, vector = scalar_and_vector(run)
    assert vector.dtype == dtype and torch.equal(bits(vector), bits(scalar))
    z = hard_values(shape, 2, torch.float32)
    run = lambda: torch.ops.dtp_ext._noisy_difference(z, None, None, "tanh", 2, True)
    scalar, vector = scalar_and_vector(run)
    assert torch.equal(bits(vector), bits(scalar))


@needs_vector_kernels
@pytest.mark.parametrize("bad", [10, 2**63 - 1, -(2**63)])
def test_vector_windows_refuse_an_index_outside_its_window(bad):
    """An index outside its window in a lane of the channel tail (channel 35 of 37) is refused
    as the scalar pass refuses it, naming the window, by both kernels."""
    z = torch.randn(2, 37, 8, 8).to(torch.bfloat16).contiguous(memory_format=CL)
    s, idx = F.max_pool2d_with_indices(torch.randn(2, 37, 8, 8), 2, 2)
    idx[1, 35, 1, 2] = bad
    with pytest.raises(IndexError, match="window at row 1, column 2"):
        torch.ops.dtp_ext._noisy_difference(z, s, idx, "elu", 2, True)
    with pytest.raises(IndexError, match="window at row 1, column 2"):
        torch.ops.dtp_ext._phi_unpool_difference(
            "dtp_ext.test", s, None, 0.0, idx, s, idx, [2, 37, 8, 8], 2, "none", 1.0, True
        )


@needs_vector_kernels
def test_vector_windows_are_counted_where_they_ran():
    """The count of windows the kernels wrote comes from the kernels: every 2x2 window of a
    channels-last map (uncovered edges included), all but the one whose clean index is refused
    (the scalar pass rewrites and refuses it), none when switched off or for NCHW maps."""
    z = torch.randn(2, 37, 7, 9).to(torch.bfloat16).contiguous(memory_format=CL)
    s, idx = F.max_pool2d_with_indices(torch.randn(2, 37, 7, 9), 2, 2)
    windows = 2 * 3 * 4

    def written(run):
        before = ops.cpu_vector_windows_written()
        run()
        return ops.cpu_vector_windows_written() - before

    noisy = lambda z, i: torch.ops.dtp_ext._noisy_difference(z, s, i, "elu", 2, True)
    assert written(lambda: noisy(z, idx)) == windows
    scatter = lambda: torch.ops.dtp_ext._phi_unpool_difference(
        "dtp_ext.test", s, None, 0.0, idx, s, idx, [2, 37, 7, 9], 2, "none", 1.0, True
    )
    assert written(scatter) == windows
    bad = idx.clone()
    bad[1, 35, 1, 2] = 10

    def refused():
        with pytest.raises(IndexError):
            noisy(z, bad)

    assert written(refused) == windows - 1
    with ops.cpu_vector_kernels(False):
        assert written(lambda: noisy(z, idx)) == 0
    nchw = torch.ops.dtp_ext._noisy_difference
    assert written(lambda: nchw(z.contiguous(), s, idx, "elu", 2, False)) == 0


def test_vector_kernels_follow_the_cpu_and_the_switch():
    """The report comes from the CPU's flags: on with AVX-512 F/BW/VL (as /proc/cpuinfo lists
    them), off without; the switch turns them off and back."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags here")
    has = {"avx512f", "avx512bw", "avx512vl"} <= set(flags)
    assert ops.cpu_vector_kernels_enabled() == has
    with ops.cpu_vector_kernels(False):
        assert not ops.cpu_vector_kernels_enabled()
    assert ops.cpu_vector_kernels_enabled() == has
