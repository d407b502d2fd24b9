"""A CPU compressor serving a rank whose model trains on a device."""
from __future__ import annotations

import dataclasses

from .base import Compressor


class OnHost(Compressor):
    """The quantizers' codecs run on the CPU. For a device rank, each step copies the gradients and
    control words once into a host twin of the layout (pinned memory), lets the CPU compressor
    exchange them there, and copies the result back once: two copies of the gradient a step, at
    the bus's speed. Its encoding is not overlapped with backward (the twin is filled after it)."""

    def __init__(self, inner: type[Compressor], layout, world, cfg):
        self.twin = layout.host_twin()
        self.inner = inner(self.twin, world, dataclasses.replace(cfg, bucket_mb=0.0))
        self.name, self.biased = inner.name, inner.biased  # before the base class reads `biased`
        self.linear, self.reshardable = self.inner.linear, self.inner.reshardable
        super().__init__(layout, world, cfg)

    def aggregate(self, step: int) -> None:
        self.twin.flat.copy_(self.layout.flat)
        self.inner.aggregate(step)
        self.layout.flat.copy_(self.twin.flat)
        self.stats = self.inner.stats

    def state_dict(self, copy: bool = True) -> dict:
        return self.inner.state_dict(copy)

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def state_layout(self) -> dict:
        return self.inner.state_layout()
