"""The baseline every figure is compared to: one in-place Allreduce of all gradients."""
from __future__ import annotations

from .base import Compressor, register


@register
class Dense(Compressor):
    name = "dense"

    def aggregate(self, step: int) -> None:
        flat = self.layout.flat  # gradients and control words, contiguous
        self.world.allreduce_(flat)
        flat.div_(self.world.size)
