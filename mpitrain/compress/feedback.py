"""Error feedback: what compression left out of a rank's share, added back before the next step's
is compressed (Karimireddy et al. 2019). A biased compressor converges only with it, and with it
the sum of everything sent over all steps is the sum of the gradients minus the last residual."""
from __future__ import annotations

import numpy as np

from .buffer import Buffer


class ErrorFeedback:
    """This rank's residual e, one fp32 buffer laid out as the compressor's `shapes` (one view per
    compressed matrix, or one flat row), and the rules every compressor follows with it.

    `enabled` False keeps the buffer at zero and adds nothing: the compressor still owns one, so
    its checkpoints keep one layout."""

    def __init__(self, shapes: list[tuple[int, int]], enabled: bool):
        self.enabled = enabled
        self.buffer = Buffer(shapes)
        self.views, self.flat, self.np = self.buffer.views, self.buffer.flat, self.buffer.np

    def add_to(self, i: int, x) -> None:
        """x += e's view i."""
        if self.enabled:
            x.add_(self.views[i])

    def kept(self, i: int):
        """e's view i, or None when nothing is kept: what a fused pass adds, or writes the new e to."""
        return self.views[i] if self.enabled else None

    def reset(self) -> None:
        self.np[...] = 0.0

    def array(self, copy: bool = True) -> np.ndarray:
        """e as a checkpoint stores it (a view of the live buffer with copy=False)."""
        return self.np.copy() if copy else self.np

    def load(self, residual: np.ndarray | None) -> None:
        """e from a checkpoint; None (dropped by --ef-resume reset) starts it at zero."""
        self.np[...] = 0.0 if residual is None else residual
