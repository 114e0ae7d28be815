"""The CUDA streams a step's blocks run on concurrently (`concurrent_blocks`,
docs/feedback_trainer.md §4): blocks share no state during the feedback phase, so small blocks
fill the device while large ones run."""

from __future__ import annotations

import contextlib

import torch


class BlockStreams:
    """One stream per block position and device, made once and reused step after step."""

    def __init__(self):
        self._streams: dict[torch.device, list] = {}

    def use(self, device: torch.device, index: int, enabled: bool = True):
        """A context that runs the `index`-th block of the step on its own stream of `device`,
        after the work queued so far on the current one (no-op off CUDA or when not
        `enabled`)."""
        if device.type != "cuda" or not enabled:
            return contextlib.nullcontext()
        streams = self._streams.setdefault(device, [])
        while len(streams) <= index:
            streams.append(torch.cuda.Stream(device))
        streams[index].wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.stream(streams[index])

    def join(self, outputs):
        """Make each device's current stream wait for every block stream, and let it own the
        `outputs` (tensors, None skipped) made on them."""
        for device, streams in self._streams.items():
            main = torch.cuda.current_stream(device)
            for stream in streams:
                main.wait_stream(stream)
            for t in outputs:
                if t is not None and t.device == device:
                    t.record_stream(main)
