"""Host copies of the costs, so that what the trainer only keeps (never computes with) does not
hold device memory.

At LLaMA-2-7B width one float32 copy of every cost is 5.1 GiB; the trainer kept five beside the
costs themselves (the last good costs, two exponential averages, the tail mean, the gradient)
on the GPU: bench/results/memory.md. :class:`HostMirror` keeps named tensors in host buffers
(pinned when the tensors live on CUDA, so that the copy is a DMA the GPU runs beside its
kernels). On the host itself it is a plain copy into buffers made once.
"""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["HostMirror"]


class HostMirror:
    """Host buffers shaped like ``tensors``; :meth:`copy_from` refreshes them.

    On CUDA the copy runs on a side stream after the work already queued, so it overlaps the
    kernels queued after it; :meth:`guard` makes the current stream wait for it (call it
    before anything overwrites the source), :meth:`wait` makes the host wait (before reading
    the buffers).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        first = next(iter(tensors.values()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        cuda = self.device.type == "cuda"
        self.buffers = {k: torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=cuda)
                        for k, v in tensors.items()}
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._event: "torch.cuda.Event | None" = None

    def copy_from(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Start copying ``tensors`` (same names and shapes) into the buffers."""
        if self._stream is None:
            with torch.no_grad():
                for k, v in tensors.items():
                    self.buffers[k].copy_(v.detach())
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(self._stream):
            for k, v in tensors.items():
                self.buffers[k].copy_(v.detach(), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(self._stream)

    def guard(self) -> None:
        """The current stream waits until the copy has read its sources."""
        if self._event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._event)

    def wait(self) -> dict[str, torch.Tensor]:
        """The buffers, once the last copy has landed in them."""
        if self._event is not None:
            self._event.synchronize()
        return self.buffers

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
