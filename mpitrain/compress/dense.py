"""The baseline every figure is compared to: one in-place Allreduce of all gradients, or, with
--bucket-mb, one per bucket of matrices started while backward still runs."""
from __future__ import annotations

from .base import Compressor, register


@register
class Dense(Compressor):
    name = "dense"
    biased = False

    def __init__(self, layout, world, cfg):
        super().__init__(layout, world, cfg)
        buckets = layout.buckets(int(cfg.bucket_mb * 2**20)) if cfg.bucket_mb else []
        self.buckets = buckets if len(buckets) > 1 else []  # one bucket would only add a collective
        self._bucket_of = {slot.index: i for i, (_, _, slots) in enumerate(self.buckets) for slot in slots}
        self._waiting, self._started, self._requests = [], 0, None

    @property
    def overlaps(self) -> bool:
        return bool(self.buckets)

    def begin(self):
        """Backward is about to run: buckets start as their gradients become final."""
        self._waiting = [len(slots) for _, _, slots in self.buckets]
        self._started, self._requests = 0, []

    def ready(self, slot):
        """A matrix's gradient is final. Buckets start strictly in order, so every rank issues the
        same collectives in the same order whatever order its hooks fire in."""
        if self._requests is None:
            return
        self._waiting[self._bucket_of[slot.index]] -= 1
        while self._started < len(self.buckets) and not self._waiting[self._started]:
            self._start(self._started)
        self.world.progress(self._requests)

    def _start(self, i: int):
        lo, hi, _ = self.buckets[i]
        self._requests += self.world.start_allreduce_(self.layout.flat_np[lo:hi])
        self._started = i + 1

    def aggregate(self, step: int) -> None:
        if self._requests is None:  # not overlapped: one Allreduce of gradients and control words
            self.world.allreduce_(self.layout.flat_np)
            return
        while self._started < len(self.buckets):  # gradients that backward never reached
            self._start(self._started)
        tail = self.layout.flat_np[self.layout.dense_offset:]
        self._requests += self.world.start_allreduce_(tail)  # dense tensors and control words
        self.world.wait(self._requests)
        self._requests = None
