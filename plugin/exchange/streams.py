"""The CUDA stream a caller's exchanges run on, apart from the stream that computes gradients.

On a CPU the hooks' buckets overlap backward because they run beside it (Horovod: on the
communication thread; DDP: while autograd goes on). On a GPU, kernels launched on the compute
stream run after each other whatever thread launches them, so compressing a bucket there would
wait for backward's kernels and delay them. ``SideStream`` gives each device one more stream for
the exchanges, ordered after the gradients they read by an event and before the code that
reads their results by ``join``. On CPU devices every method does nothing (and never touches
``torch.cuda``).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Sequence

import torch


class SideStream:
    """One ``torch.cuda.Stream`` per device, made on first use, for the exchanges of one caller.

    ``ready`` on the thread that produced the tensors, ``running`` around the exchange (any
    thread), ``join`` before the results are read on the compute stream."""

    def __init__(self):
        self._streams: Dict[torch.device, torch.cuda.Stream] = {}

    @staticmethod
    def _cuda(device) -> Optional[torch.device]:
        """``device`` with its index if it is a CUDA device, else None."""
        device = torch.device(device)
        if device.type != "cuda":
            return None
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())

    def _side(self, device) -> Optional[torch.cuda.Stream]:
        device = self._cuda(device)
        if device is None:
            return None
        side = self._streams.get(device)
        if side is None:
            side = self._streams[device] = torch.cuda.Stream(device)
        return side

    def ready(self, device) -> Optional[torch.cuda.Event]:
        """An event on this thread's current stream of ``device``, once the tensors made so far
        are written: what the side stream waits for when it runs on another thread (whose
        current stream is not the one that made them). None on a CPU device."""
        device = self._cuda(device)
        if device is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event

    @contextlib.contextmanager
    def running(self, tensors: Sequence[torch.Tensor], after: Optional[torch.cuda.Event] = None) -> Iterator[None]:
        """Run the block on the side stream of ``tensors``' device, after ``after`` (an event from
        ``ready``) or, without one, after the work queued so far on the current stream.

        ``tensors`` (the inputs, made on another stream) are recorded as used by the side stream:
        the caching allocator then cannot hand their memory to the compute stream, once they are
        freed there, before the side stream is done with them."""
        side = self._side(tensors[0].device) if tensors else None
        if side is None:
            yield
            return
        if after is None:
            side.wait_stream(torch.cuda.current_stream(side.device))
        else:
            side.wait_event(after)
        for t in tensors:
            t.record_stream(side)
        with torch.cuda.stream(side):
            yield

    def join(self, device) -> None:
        """Make the current stream of ``device`` wait for the exchanges queued on its side stream,
        before it reads their results."""
        device = self._cuda(device)
        side = self._streams.get(device) if device is not None else None
        if side is not None:  # nothing ran on this device's side stream yet: nothing to wait for
            torch.cuda.current_stream(device).wait_stream(side)
