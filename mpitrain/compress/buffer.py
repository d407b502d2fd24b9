"""One contiguous buffer and named 2-D views into it: what a round sums in one Allreduce."""
from __future__ import annotations

import numpy as np
import torch

from ..device import to_host


class Buffer:
    """One contiguous buffer and named 2-D views into it, allocated once.

    `carve(shapes)` lays smaller shapes out from the start of the same memory, for rounds whose
    sizes change from step to step (every rank carves the same shapes, so the prefix they
    Allreduce is the same length)."""

    def __init__(self, shapes: list[tuple[int, int]], extra: int = 0, flat: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        sizes = [a * b for a, b in shapes]
        self.flat = torch.zeros(sum(sizes) + extra, dtype=dtype, device=device) if flat is None \
            else flat[:sum(sizes) + extra]
        self.np = self.flat.numpy() if self.flat.device.type == "cpu" else None  # None: on a device
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.views = [self.flat[o:o + a * b].view(a, b) for o, (a, b) in zip(self.offsets, shapes)]
        self.tail = self.flat[self.offsets[-1]:]
        self.carved: dict = {}

    def carve(self, shapes: list[tuple[int, int]], extra: int = 0) -> "Buffer":
        key = (tuple(shapes), extra)  # the same every step unless ranks move (global allocation)
        if key not in self.carved:
            if len(self.carved) >= 8:
                self.carved.clear()
            self.carved[key] = Buffer(shapes, extra, flat=self.flat)
        return self.carved[key]

    def state(self, copy: bool = True) -> np.ndarray:
        """The values as a host array (a view of a CPU buffer's memory unless `copy`)."""
        return to_host(self.flat, copy)

    def load(self, values) -> None:
        """The values from a host array of the same size, onto wherever the buffer lives."""
        self.flat.copy_(torch.as_tensor(np.asarray(values)).reshape(-1))
