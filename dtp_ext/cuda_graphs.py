"""CUDA graphs of the feedback loops (`FeedbackTrainer(..., cuda_graphs=True)`).

A block's K-iteration loop launches some 13 kernels per iteration from the host; on a GPU
those launches, not the kernels, bound small blocks. Here each block's whole loop (one
`ldrl_feedback_loop` call: noise draws, batched forward passes, every iteration and the SGD
updates) is captured once as a CUDA graph and replayed on later steps: one graph launch plus
the copies of the step's inputs into the graph's own.

What a replay relies on, and how it is kept:
- Addresses: the captured kernels read and write fixed tensors. The step's inputs (recorded
  input, forward weight and bias, cast to the compute dtype) are copied into the graph's
  static copies before each replay; the loop's state (feedback weight and bias, momentum) is
  updated in place, so its addresses are part of the cache key, and a new state tensor
  (load_state_dict, a restored checkpoint) means a new capture.
- Everything the host decided at capture: shapes, dtypes, K, the hyperparameters, chunking,
  the finite checks and TF32 switches are in the key; a change captures again.
- Noise: torch's graph-safe generator replays draw from the generator's offset at replay time
  and advance it by the whole graph's draws, so a replayed step draws the numbers the eager
  loop would have (tests/cuda/test_cuda_graphs.py checks replay against eager, bitwise).
- Errors: non-finite inputs are caught by the deferred device flags the captured checks set
  (read once per step by the divergence guard); a check that reads its result on the host
  (`deferred_finite_checks("nowhere")`) cannot be captured, so those loops run eagerly. Ctrl-C
  is noticed between steps, not between iterations.
- Streams: each block captures on a stream of its own, kept for the trainer's life and never
  another block's: cuBLAS keeps a workspace per stream, which a graph captured on the stream
  uses and which is freed when that graph is, so two graphs must not share a capture stream.
  Captures are thread-local (`capture_error_mode="thread_local"`), so CUDA calls from other
  threads (a DataLoader's pinning thread) do not break them.

The first step with a new key runs eagerly (it also warms cuDNN and cuBLAS up, and allocates
the deferred-check flag outside the graph), then captures; replays start at the next step. Each
block's graph keeps the loop's peak working memory in its own pool for as long as it lives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import ops


@dataclass
class _Captured:
    key: tuple
    inputs: tuple  # the graph's static copies (None where the loop takes no tensor)
    graph: torch.cuda.CUDAGraph
    losses: torch.Tensor  # written by every replay
    kernel: str  # what the captured call ran (ops.last_kernel() at capture)


def _tensor_key(t):
    if t is None:
        return None
    return (tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def _runs_on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


def applies(x: torch.Tensor, noise_x, noise_y) -> bool:
    """Whether a block's loop runs from a graph: a CUDA block drawing its own noise, with finite
    checks that do not read their result on the host."""
    return (
        _runs_on_gpu(x)
        and noise_x is None
        and noise_y is None
        and not ops.finite_checks_synchronise(x.device)
    )


def _new_graph() -> torch.cuda.CUDAGraph:
    return torch.cuda.CUDAGraph()


def _new_stream(device: torch.device, taken: set) -> torch.cuda.Stream:
    """A capture stream no other block's graph uses. Drawn from the high-priority pool (the
    trainer's block streams come from the default-priority one), which hands its 32 streams out
    in turn: draw until a free one comes."""
    for _ in range(64):
        stream = torch.cuda.Stream(device=device, priority=-1)
        if stream.cuda_stream not in taken:
            return stream
    raise RuntimeError(
        "FeedbackTrainer: cuda_graphs=True needs a capture stream per block and every stream of "
        "the pool is taken (more than 32 captured blocks on one device); run with "
        "cuda_graphs=False"
    )


def _capture(graph, stream, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fn() captured into graph (nothing executes) on `stream`, after the work queued so far;
    returns fn's output tensor (written by each replay)."""
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        out = fn()
    current.wait_stream(stream)
    return out


def _host_settings() -> tuple:
    """What the host decides at capture besides the loop's own arguments: the checks and the
    libraries' precision and algorithm switches."""
    cuda, cudnn = torch.backends.cuda, torch.backends.cudnn
    return (
        ops.finite_checks_enabled(),  # (deferred: applies() runs host-reading checks eagerly)
        cuda.matmul.allow_tf32,
        cuda.matmul.allow_bf16_reduced_precision_reduction,
        cuda.matmul.allow_fp16_reduced_precision_reduction,
        str(cuda.preferred_blas_library()),
        cudnn.enabled,
        cudnn.allow_tf32,
        cudnn.deterministic,
        cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
    )


class LoopGraphs:
    """One captured loop per block name, replaced when its key changes."""

    def __init__(self):
        self._captured: dict[str, _Captured] = {}
        self._streams: dict[str, torch.cuda.Stream] = {}  # each block's capture stream

    def run(
        self,
        name: str,
        inputs: tuple,
        state: tuple,
        settings: tuple,
        loop: Callable[[tuple], torch.Tensor],
    ) -> tuple[torch.Tensor, str]:
        """The losses of `loop(inputs)` for this step and the kernel report. `inputs`: the
        tensors that change from step to step (copied into the graph's); `state`: the tensors
        the loop updates in place; `settings`: every other value the loop call depends on."""
        key = (
            tuple(_tensor_key(t) for t in inputs),
            tuple((t.data_ptr(), _tensor_key(t)) for t in state),
            settings,
            _host_settings(),
        )
        captured = self._captured.get(name)
        if captured is not None and captured.key == key:
            for static, t in zip(captured.inputs, inputs):
                if static is not None:
                    static.copy_(t)
            captured.graph.replay()
            return captured.losses.clone(), f"{captured.kernel} (CUDA graph replay)"
        self._captured.pop(name, None)
        losses = loop(inputs)  # this step's result, and the warm-up before capture
        kernel = ops.last_kernel()
        static = tuple(None if t is None else t.clone() for t in inputs)
        graph = _new_graph()
        try:
            captured_losses = _capture(
                graph, self._stream(name, losses.device), lambda: loop(static)
            )
        except Exception as exc:
            raise RuntimeError(
                f"FeedbackTrainer: capturing block {name!r}'s feedback loop as a CUDA graph "
                f"failed ({type(exc).__name__}: {exc}); run with cuda_graphs=False"
            ) from exc
        self._captured[name] = _Captured(key, static, graph, captured_losses, kernel)
        return losses, kernel

    def _stream(self, name: str, device: torch.device):
        stream = self._streams.get(name)
        if stream is None or stream.device != device:
            taken = {s.cuda_stream for n, s in self._streams.items() if n != name}
            stream = self._streams[name] = _new_stream(device, taken)
        return stream
