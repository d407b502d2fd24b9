"""The baseline every figure is compared to: one in-place Allreduce of all gradients, or, with
--bucket-mb, one per bucket of matrices started while backward still runs."""
from __future__ import annotations

from .base import Buckets, Compressor, register


@register
class Dense(Compressor):
    name = "dense"
    biased = False
    on_device = True

    def __init__(self, layout, world, cfg):
        super().__init__(layout, world, cfg)
        self.buckets = Buckets(layout, world, int(cfg.bucket_mb * 2**20),
                               lambda bucket: world.start_allreduce_(layout.flat_np[bucket[0]:bucket[1]]))

    @property
    def overlaps(self) -> bool:
        return len(self.buckets) > 0

    def begin(self):
        self.buckets.begin()

    def aggregate(self, step: int) -> None:
        if not self.buckets.in_flight:  # not overlapped: one Allreduce of gradients and control words
            self.wire.allreduce_(self.layout.flat)
            return
        tail = self.layout.flat_np[self.layout.dense_offset:]  # dense tensors and control words, last
        self.buckets.finish(lambda: self.world.start_allreduce_(tail))
