"""The baseline every figure is compared to: one in-place Allreduce of all gradients."""
from __future__ import annotations

from .base import Compressor, register


@register
class Dense(Compressor):
    name = "dense"
    biased = False

    def aggregate(self, step: int) -> None:
        self.world.allreduce_(self.layout.flat_np)  # shares of gradients and control words, contiguous
