"""CUDA graphs of the feedback loops (FeedbackTrainer(cuda_graphs=True), dtp_ext/cuda_graphs.py):
a replayed step gives the eager loop's losses and feedback weights bit for bit, noise included;
a changed setting, batch or state captures again; NaN is still refused. The GPU tests skip here
and run in benchmarks/gpu_check.sh; the switch's CPU behaviour is tested everywhere."""

import types

import pytest
import torch

import dtp_ext
from dtp_ext.models import simple_vgg
from tests.helpers.cuda import needs_cuda

pytestmark = [pytest.mark.cuda]

SETTINGS = dict(iterations=[6, 6, 8, 8, 6], noise_std=0.1, lr=1e-3)


@pytest.fixture
def deterministic_cudnn():
    previous = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = previous


def small_vgg(device):
    torch.manual_seed(0)
    return simple_vgg(widths=(8, 8, 16, 16, 32)).to(device)


def run_steps(device, batches, cuda_graphs, between=None, **trainer_kwargs):
    """Feedback steps on `batches` (sizes), seeded once; `between(i, trainer)` may change
    something before step i. Returns per-step losses and kernel reports, and the final feedback
    weights."""
    model = small_vgg(device)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(b, 3, 32, 32, generator=gen).to(device) for b in batches]
    trainer = dtp_ext.FeedbackTrainer(model, **SETTINGS, cuda_graphs=cuda_graphs, **trainer_kwargs)
    torch.manual_seed(5)
    losses, kernels = [], []
    for i, x in enumerate(xs):
        if between is not None:
            between(i, trainer)
        model(x)
        report = trainer.step()
        losses.append({n: v.clone() for n, v in report.losses.items()})
        kernels.append(dict(report.kernels))
    return losses, kernels, [b.feedback_weight.clone() for _, b in trainer.blocks]


def assert_same(eager, graphed):
    for step_eager, step_graphed in zip(eager[0], graphed[0]):
        assert step_eager.keys() == step_graphed.keys()
        for name in step_eager:
            assert torch.equal(step_eager[name], step_graphed[name]), name
    for a, b in zip(eager[2], graphed[2]):
        assert torch.equal(a, b)


def test_cuda_graphs_argument_is_checked():
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        dtp_ext.FeedbackTrainer(small_vgg("cpu"), **SETTINGS, cuda_graphs="yes")


def test_cpu_blocks_run_eagerly_with_the_switch_on():
    """Graphs are for CUDA blocks: on the CPU the switch changes nothing, and the report names
    the eager kernel."""
    eager = run_steps("cpu", [4, 4], cuda_graphs=False)
    graphed = run_steps("cpu", [4, 4], cuda_graphs=True)
    assert_same(eager, graphed)
    for kernels in graphed[1]:
        assert set(kernels.values()) == {"dtp_ext::ldrl_feedback_loop[CPU]"}


@needs_cuda
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
def test_replays_equal_the_eager_loop_bitwise(deterministic_cudnn, compute_dtype):
    """Step 0 runs eagerly and captures, steps 1-3 replay: the same losses and feedback weights
    as four eager steps from the same seed (the replays draw the eager noise)."""
    eager = run_steps("cuda", [8] * 4, False, compute_dtype=compute_dtype)
    graphed = run_steps("cuda", [8] * 4, True, compute_dtype=compute_dtype)
    assert_same(eager, graphed)
    assert all("graph" not in k for k in graphed[1][0].values())
    for kernels in graphed[1][1:]:
        assert all(
            k == "dtp_ext::ldrl_feedback_loop[CUDA] (CUDA graph replay)" for k in kernels.values()
        )


def change_between_steps(i, trainer):
    """Step 2: a new lr; step 5: the trainer's state reloaded (into its own buffers: the graphs
    stay valid); step 6: the first block's feedback weight replaced by a copy (a new tensor)."""
    if i == 2:
        trainer.lr = 2e-3
    if i == 5:
        trainer.load_state_dict(trainer.state_dict())
    if i == 6:
        block = trainer.blocks[0][1]
        block.feedback_weight = block.feedback_weight.clone()


CHANGING_BATCHES = [8, 8, 8, 8, 5, 5, 5, 5]  # step 4: a smaller batch
# Whether the first trained block's step replayed (True) or ran eagerly and captured.
FIRST_BLOCK_REPLAYED = [False, True, False, True, False, True, False, True]


def replays(kernels, block):
    return ["graph" in k[block] for k in kernels]


@needs_cuda
def test_a_changed_setting_batch_or_state_captures_again(deterministic_cudnn):
    """A new lr, a smaller batch or a new state tensor runs eagerly and captures again; a
    reloaded trainer state does not; results equal the eager run with the same changes."""
    eager = run_steps("cuda", CHANGING_BATCHES, False, change_between_steps)
    graphed = run_steps("cuda", CHANGING_BATCHES, True, change_between_steps)
    assert_same(eager, graphed)
    first, second = list(graphed[0][0])[:2]
    assert replays(graphed[1], first) == FIRST_BLOCK_REPLAYED
    assert replays(graphed[1], second)[6] is True  # only the replaced block captured again


@needs_cuda
def test_non_finite_input_is_refused_on_a_replay():
    """The captured loop's deferred checks still refuse a NaN input: the step raises the
    deferred check's error (not only the divergence guard's), every block's feedback weights are
    restored, and the next clean step replays and passes (the flag was cleared)."""
    model = small_vgg("cuda")
    trainer = dtp_ext.FeedbackTrainer(model, **SETTINGS, cuda_graphs=True)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    for _ in range(2):  # capture, then replay once
        model(x)
        trainer.step()
    before = [b.feedback_weight.clone() for _, b in trainer.blocks]
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    model(bad)
    with pytest.raises(FloatingPointError, match="received a non-finite input"):
        trainer.step()
    for (_, b), w in zip(trainer.blocks, before):
        assert torch.equal(b.feedback_weight, w)
    model(x)
    report = trainer.step()
    assert all("graph replay" in k for k in report.kernels.values())


def check_alternating_recaptures(device, **trainer_kwargs):
    """The first block's lr alternates every step; batches go 8, 8, 5, 5, ..."""

    def alternate_first_lr(i, trainer):
        trainer.lr = [1e-3 * (1 + i % 2)] + [1e-3] * 4

    batches = [8, 8, 5, 5] * 3
    eager = run_steps(device, batches, False, alternate_first_lr, **trainer_kwargs)
    graphed = run_steps(device, batches, True, alternate_first_lr, **trainer_kwargs)
    assert_same(eager, graphed)
    first, second = list(graphed[0][0])[:2]
    assert not any(replays(graphed[1], first))
    assert replays(graphed[1], second) == [False, True] * 6


@needs_cuda
@pytest.mark.parametrize("concurrent", [True, False], ids=["concurrent", "serial"])
def test_many_recaptures_stay_equal_to_eager(deterministic_cudnn, concurrent):
    """The first block's lr alternates every step (it captures again each time) while the
    batches go 8, 8, 5, 5, ... (the other blocks capture at each new size and replay in between):
    graphs recaptured, freed and replayed side by side for 12 steps. A recapture frees only its
    own graph's memory and cuBLAS workspace (each block captures on a stream of its own), so every
    step equals the eager one bitwise, on concurrent block streams and serially."""

    check_alternating_recaptures("cuda", concurrent_blocks=concurrent)


@needs_cuda
def test_checks_that_read_on_the_host_run_eagerly():
    """deferred_finite_checks("nowhere") makes a check read its result on the host, which a
    capture cannot hold: those loops run eagerly (the report says so) and still refuse NaN."""
    with dtp_ext.ops.deferred_finite_checks("nowhere"):
        losses, kernels, _ = run_steps("cuda", [8, 8, 8], True)
    assert all("graph" not in k for step in kernels for k in step.values())


class StandInGraph:
    """A CPU stand-in for torch.cuda.CUDAGraph: "capture" keeps the call without running it (as
    stream capture launches nothing), replay runs it on the graph's static inputs into the
    captured output tensor. With it the caching, the static input copies and the reports of
    dtp_ext/cuda_graphs.py run on the CPU; what it cannot show (the real capture, the
    generator's graph-safe offsets) the GPU tests above check."""

    def replay(self):
        self.output.set_(self.fn())


def stand_in_capture(graph, stream, fn):
    graph.fn, graph.output = fn, torch.empty(0)
    return graph.output


def stand_in_stream(device, taken):
    return types.SimpleNamespace(cuda_stream=len(taken) + 1, device=device)


@pytest.fixture
def stand_in_graphs(monkeypatch):
    """CUDA graphs on the CPU: stand-in graphs and streams, and the CPU's finite checks deferred
    (as CUDA's are) so the loops are capturable."""
    monkeypatch.setattr(dtp_ext.cuda_graphs, "_new_graph", StandInGraph)
    monkeypatch.setattr(dtp_ext.cuda_graphs, "_new_stream", stand_in_stream)
    monkeypatch.setattr(dtp_ext.cuda_graphs, "_capture", stand_in_capture)
    monkeypatch.setattr(dtp_ext.cuda_graphs, "_runs_on_gpu", lambda x: True)
    with dtp_ext.ops.deferred_finite_checks("everywhere"):
        yield


def test_graph_cache_on_the_cpu_with_a_stand_in_graph(stand_in_graphs):
    """The same steps and changes as test_a_changed_setting_batch_or_state_captures_again: each
    replay copies the step's inputs into the graph's (otherwise the new batches would not be
    seen), the captured call is keyed by settings, batch and state tensors, and the reports say
    which steps replayed; results equal the eager loop bitwise, in float32 and bfloat16."""
    eager = run_steps("cpu", CHANGING_BATCHES, False, change_between_steps)
    graphed = run_steps("cpu", CHANGING_BATCHES, True, change_between_steps)
    assert_same(eager, graphed)
    first, second = list(graphed[0][0])[:2]
    assert replays(graphed[1], first) == FIRST_BLOCK_REPLAYED
    assert replays(graphed[1], second)[6] is True
    assert graphed[1][1][first] == "dtp_ext::ldrl_feedback_loop[CPU] (CUDA graph replay)"
    bf16 = run_steps("cpu", [4, 4, 4], True, compute_dtype=torch.bfloat16)
    assert_same(run_steps("cpu", [4, 4, 4], False, compute_dtype=torch.bfloat16), bf16)


def test_checks_read_on_the_host_are_not_captured(stand_in_graphs):
    """With the CPU's checks immediate again (they read their result on the host), the loops run
    eagerly though graphs are on."""
    with dtp_ext.ops.deferred_finite_checks("nowhere"):
        _, kernels, _ = run_steps("cpu", [4, 4], True)
    assert all("graph" not in k for step in kernels for k in step.values())


def test_alternating_recaptures_on_the_cpu(stand_in_graphs):
    """test_many_recaptures_stay_equal_to_eager's cache pattern with the stand-in graph."""
    check_alternating_recaptures("cpu")
