"""Error feedback: what compression left out of a rank's share, added back before the next step's
is compressed (Karimireddy et al. 2019). A biased compressor converges only with it, and with it
the sum of everything sent over all steps is the sum of the gradients minus the last residual."""
from __future__ import annotations

import numpy as np

from .buffer import Buffer


class ErrorFeedback:
    """This rank's residual e: one fp32 buffer laid out as the compressor's `shapes` (a view per
    compressed matrix, or one flat row), and the rules every compressor follows with it.

    `enabled` False adds nothing and keeps e at zero; `shapes` None keeps no buffer at all (a
    compressor that never needs one), and then a checkpoint holds none either. A compressor that
    writes the new residual while the old is still being added (an encode overlapped with
    backward) writes it to `spare()`, and `swap()` makes that e once the step is known finite."""

    def __init__(self, shapes: list[tuple[int, int]] | None, enabled: bool, device="cpu"):
        self.enabled = enabled
        self.buffer = None if shapes is None else Buffer(shapes, device=device)
        self._spare: Buffer | None = None

    def add_to(self, i: int, x) -> None:
        """x += e's view i (x a tensor of its shape)."""
        if self.enabled:
            x.add_(self.buffer.views[i])

    def add_range(self, x: np.ndarray, lo: int = 0, hi: int | None = None) -> None:
        """x[lo:hi] += e[lo:hi], e flat."""
        if self.enabled:
            x[lo:hi] += self.buffer.np[lo:hi]

    def kept(self, i: int):
        """e's view i, or None when nothing is kept: what a fused pass adds, or writes the new e to."""
        return self.buffer.views[i] if self.enabled else None

    def target(self) -> np.ndarray | None:
        """The flat buffer a step writes its new e to in place, or None when nothing is kept."""
        return self.buffer.np if self.enabled else None

    def spare(self) -> np.ndarray | None:
        """A second flat buffer of e's layout, for a new e written while e is still being added."""
        if not self.enabled:
            return None
        if self._spare is None:
            self._spare = Buffer([tuple(v.shape) for v in self.buffer.views])
        return self._spare.np

    def swap(self) -> None:
        """What `spare()` holds becomes e (the step was finite); e's memory is the next spare."""
        if self.enabled:
            self.buffer, self._spare = self._spare, self.buffer

    def reset(self) -> None:
        self.buffer.flat.zero_()

    def array(self, copy: bool = True) -> np.ndarray | None:
        """e as a checkpoint stores it (a view of the live buffer with copy=False), None if none is kept."""
        if self.buffer is None:
            return None
        return self.buffer.state(copy)

    def load(self, residual: np.ndarray | None) -> None:
        """e from a checkpoint; None (dropped by --ef-resume reset) starts it at zero."""
        if self.buffer is not None:
            self.buffer.flat.zero_() if residual is None else self.buffer.load(residual)

    def state_dict(self, copy: bool = True) -> dict:
        residual = self.array(copy)
        return {} if residual is None else {"residual": residual}
