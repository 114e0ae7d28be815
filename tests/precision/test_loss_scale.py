"""dtp_ext.loss_scale: scaled losses, GradScaler and gradient accumulation give backprop's
relation to the unscaled gradients, float64, linear and conv networks with activations folded
into their blocks (where the target step is nonlinear in delta)."""

import _thread
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtp_ext


def linear_net():
    return dtp_ext.convert(
        nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)), fold=True
    ).double()


def conv_net():
    return dtp_ext.convert(
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(6 * 4 * 4, 5),
        ),
        fold=True,
    ).double()


NETS = {"linear": (linear_net, (12, 8), 4), "conv": (conv_net, (12, 2, 8, 8), 5)}


def batch(net, seed=1):
    _, shape, classes = NETS[net]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    # Feed the first block through a trainable input so it returns a target too.
    return x.requires_grad_(True), torch.randint(0, classes, (shape[0],), generator=g)


def grads(model, x):
    return [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]


def unscaled(net):
    torch.manual_seed(0)
    model = NETS[net][0]()
    x, y = batch(net)
    F.cross_entropy(model(x), y).backward()
    return model, grads(model, x)


def assert_close_all(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("k", [1024.0, 1 / 3])
def test_scaled_loss_gives_k_times_the_gradients(net, k):
    model, expected = unscaled(net)
    model.zero_grad()
    x, y = batch(net)
    with dtp_ext.loss_scale(k):
        (k * F.cross_entropy(model(x), y)).backward()
    assert_close_all([g / k for g in grads(model, x)], expected)


@pytest.mark.parametrize("net", sorted(NETS))
def test_without_loss_scale_a_scaled_loss_changes_the_direction(net):
    """The failure the API exists for: the hidden updates are not k x the unscaled ones."""
    model, expected = unscaled(net)
    model.zero_grad()
    x, y = batch(net)
    (1024 * F.cross_entropy(model(x), y)).backward()
    # Every target step through a block with an activation is nonlinear in delta: the linear
    # net's tanh block returns the wrong input gradient, the conv net's first conv learns
    # from a target propagated through conv2's tanh.
    changed = grads(model, x)[-1 if net == "linear" else 0] / 1024
    assert not torch.allclose(changed, expected[-1 if net == "linear" else 0], rtol=1e-3)


@pytest.mark.parametrize("net", sorted(NETS))
def test_grad_scaler_unscales_to_the_unscaled_gradients(net):
    model, expected = unscaled(net)
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    x, y = batch(net)
    with dtp_ext.loss_scale(scaler.get_scale()):
        scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    assert_close_all([p.grad for p in model.parameters()], expected[:-1])


@pytest.mark.parametrize("net", sorted(NETS))
def test_accumulated_micro_batches_equal_one_batch(net):
    model, expected = unscaled(net)
    model.zero_grad()
    x, y = batch(net)
    n = 3
    for xs, ys in zip(x.detach().chunk(n), y.chunk(n)):
        xs.requires_grad_(True)
        with dtp_ext.loss_scale(1 / n):
            (F.cross_entropy(model(xs), ys) / n).backward()
    assert_close_all([p.grad for p in model.parameters()], expected[:-1])


def test_a_thread_has_its_own_scale():
    """Like torch.autocast, the scale belongs to the thread that enters the block: a thread
    started inside it runs an unscaled backward unless it enters its own."""
    model, expected = unscaled("linear")
    result = {}

    def plain():
        model.zero_grad()
        x, y = batch("linear")
        F.cross_entropy(model(x), y).backward()
        result["plain"] = grads(model, x)

    def scaled():
        model.zero_grad()
        x, y = batch("linear")
        with dtp_ext.loss_scale(8.0):
            (8.0 * F.cross_entropy(model(x), y)).backward()
        result["scaled"] = [g / 8.0 for g in grads(model, x)]

    with dtp_ext.loss_scale(4.0):
        for target in (plain, scaled):
            worker = threading.Thread(target=target)
            worker.start()
            worker.join()
    assert_close_all(result["plain"], expected)
    assert_close_all(result["scaled"], expected)


def test_threads_python_did_not_start_read_the_scale_threads_agree_on():
    """Autograd's CUDA device threads (started by C++, dummy threads to Python, as a thread of
    _thread.start_new_thread is) see the scale of the threads inside a loss_scale block; while
    those disagree, reading it is refused, never guessed. Such a thread inside a block of its
    own reads its own."""

    def on_a_dummy_thread(fn):
        done, result = threading.Event(), {}

        def run():
            try:
                assert isinstance(threading.current_thread(), threading._DummyThread)
                result["value"] = fn()
            except BaseException as exc:  # handed to the caller
                result["error"] = exc
            done.set()

        _thread.start_new_thread(run, ())
        assert done.wait(5)
        if "error" in result:
            raise result["error"]
        return result["value"]

    def device_thread_reads():
        return on_a_dummy_thread(dtp_ext.current_loss_scale)

    def own_block_reads():
        with dtp_ext.loss_scale(4.0):
            return dtp_ext.current_loss_scale()

    assert device_thread_reads() == 1.0

    def holding(k):
        """A thread inside loss_scale(k) until the returned event is set (daemon: a failing
        assertion cannot leave the test run waiting for it)."""
        entered, leave = threading.Event(), threading.Event()

        def hold():
            with dtp_ext.loss_scale(k):
                entered.set()
                leave.wait(30)

        threading.Thread(target=hold, daemon=True).start()
        assert entered.wait(5)
        return leave

    with dtp_ext.loss_scale(2.0):
        assert device_thread_reads() == 2.0
        leave = holding(2.0)
        try:
            assert device_thread_reads() == 2.0  # two threads, one scale
        finally:
            leave.set()
        leave = holding(3.0)
        try:
            with pytest.raises(RuntimeError, match=r"different loss scales \[2.0, 3.0\]"):
                device_thread_reads()
            assert on_a_dummy_thread(own_block_reads) == 4.0
        finally:
            leave.set()
        deadline = time.monotonic() + 5
        while dtp_ext.loss_scaling._by_thread.keys() - {threading.get_ident()} and (
            time.monotonic() < deadline
        ):
            time.sleep(0.01)  # the holder leaves its block
        assert device_thread_reads() == 2.0
    assert device_thread_reads() == 1.0


def test_scales_nest_multiply_and_restore():
    assert dtp_ext.current_loss_scale() == 1.0
    with dtp_ext.loss_scale(4):
        with dtp_ext.loss_scale(0.5):
            assert dtp_ext.current_loss_scale() == 2.0
        assert dtp_ext.current_loss_scale() == 4.0
    assert dtp_ext.current_loss_scale() == 1.0
    with pytest.raises(RuntimeError):
        with dtp_ext.loss_scale(3):
            raise RuntimeError("inside")
    assert dtp_ext.current_loss_scale() == 1.0


@pytest.mark.parametrize("bad", [0, -2.0, float("inf"), float("nan"), "2", True, None])
def test_bad_scale_is_refused(bad):
    with pytest.raises(ValueError, match="dtp_ext.loss_scale: k must be a finite number > 0"):
        with dtp_ext.loss_scale(bad):
            pass
    assert dtp_ext.current_loss_scale() == 1.0


@pytest.mark.parametrize(
    "order",
    [
        ("A+", "B+", "A-", "B-"),
        ("A+", "B+", "B-", "A-"),
        ("B+", "A+", "A-", "B-"),
        ("B+", "A+", "B-", "A-"),
        ("A+", "A-", "B+", "B-"),
    ],
    ids=lambda o: "".join(o),
)
def test_scales_entered_and_left_by_two_threads_in_any_order(order):
    """Two threads' loss_scale blocks (A: 2, B: 3) entered and left in `order`: after every
    event each thread reads its own scale, a backward on a third thread with its own scale
    (5) gets that scale's exact gradients, and nothing is left behind (1.0 everywhere at the
    end)."""
    factors = {"A": 2.0, "B": 3.0}
    events = {name: [threading.Event(), threading.Event()] for name in factors}
    done = threading.Event()
    read = {}

    def worker(name):
        enter, leave = events[name]
        enter.wait(30)
        with dtp_ext.loss_scale(factors[name]):
            read[name] = dtp_ext.current_loss_scale()
            done.set()
            leave.wait(30)
        read[name] = dtp_ext.current_loss_scale()
        done.set()

    threads = {n: threading.Thread(target=worker, args=(n,), daemon=True) for n in factors}
    for t in threads.values():
        t.start()
    model, expected = unscaled("linear")
    for event in order:
        name, what = event[0], event[1]
        done.clear()
        events[name][0 if what == "+" else 1].set()
        assert done.wait(5)
        assert read[name] == (factors[name] if what == "+" else 1.0)
        assert dtp_ext.current_loss_scale() == 1.0  # the main thread holds none
        result = {}

        def third(result=result):
            model.zero_grad()
            x, y = batch("linear")
            with dtp_ext.loss_scale(5.0):
                (5.0 * F.cross_entropy(model(x), y)).backward()
            result["grads"] = grads(model, x)

        t = threading.Thread(target=third)
        t.start()
        t.join()
        assert_close_all([g / 5.0 for g in result["grads"]], expected)
    for t in threads.values():
        t.join()
    assert dtp_ext.current_loss_scale() == 1.0
    assert dtp_ext.loss_scaling._shared == 1.0 and not dtp_ext.loss_scaling._by_thread
