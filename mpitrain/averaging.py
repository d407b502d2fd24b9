"""Parameter averaging: H local optimizer steps per rank, then the ranks average what the model moved.

Every rank keeps the anchor (the parameters all ranks agreed on at the last average) and runs
its own inner optimizer on its own shard. Every H steps each rank puts its delta
d_i = anchor - params_i into the gradient buffer, scaled by 1/N, and the compressor turns the
shares into the mean delta, with its error feedback carrying what compression left out to the
next round. The outer step then moves the anchor, and every rank takes the new anchor:

    average    anchor -= mean_delta                                  (plain parameter averaging)
    nesterov   v = mu v + mean_delta; anchor -= lr (mean_delta + mu v)   (DiLoCo's outer step)

Before each average one small Allreduce carries each rank's ||d_i||^2, a non-finite flag and a
count sketch S d_i (SKETCH buckets with random signs, the same on every rank). The sketch is
linear, so mean ||S d_i||^2 - ||mean S d_i||^2 = mean ||S (d_i - mean d)||^2 estimates the rank
disagreement mean_i ||params_i - mean params||^2 without a dense exchange (E||S v||^2 = ||v||^2;
relative error about sqrt(2 / SKETCH) / sqrt(N) when no coordinate dominates).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .compress.base import kernels
from .compress.streams import Purpose, torch_stream
from .layout import all_finite

SKETCH = 256  # buckets: the round's report is 2 KiB


@dataclass
class Round:
    """What one average agreed on, the same on every rank."""
    index: int         # rounds are numbered from 0
    nonfinite: bool    # some rank's delta held NaN/Inf: nobody moved, every rank is back at the anchor
    wire_bytes: int    # bytes this rank handed to the network for this round
    stats: dict = field(default_factory=dict)  # delta norms, disagreement, the compressor's report


class ParameterAveraging:
    """The anchor, the outer optimizer and the round itself, for an Exchange's layout and compressor."""

    def __init__(self, layout, world, compressor, every: int, outer: str = "average", outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, seed: int = 0):
        self.layout, self.world, self.compressor = layout, world, compressor
        self.every, self.outer_lr, self.outer_momentum = every, outer_lr, outer_momentum
        self.anchor = layout.params.clone()
        self.momentum = torch.zeros_like(self.anchor) if outer == "nesterov" else None  # average: outer lr 1
        self.local_steps = 0  # optimizer steps since the last average (0: params == anchor)
        generator = torch_stream(seed, 0, 0, Purpose.AVERAGING_SIGNS)
        padded = math.ceil(layout.numel / SKETCH) * SKETCH
        self._signs = (torch.randint(0, 2, (layout.numel,), generator=generator, dtype=torch.int8) * 2 - 1)
        self._signed = torch.zeros(padded, dtype=torch.float32)  # d_i * signs, zero-padded to whole buckets
        self._report = np.zeros(SKETCH + 3, dtype=np.float64)  # [S d_i, ||S d_i||^2, ||d_i||^2, non-finite]

    def reset_anchor(self):
        """Take the current parameters as agreed (after a load or a broadcast)."""
        self.anchor.copy_(self.layout.params)
        self.local_steps = 0

    def due(self, done: int, last: bool) -> bool:
        """Whether the step that completed `done` steps ends a round (always on the last step)."""
        return self.local_steps > 0 and (done % self.every == 0 or last)

    def average(self, done: int) -> Round:
        """Every rank calls it at the same step: exchange the deltas, take the outer step."""
        layout, world, size = self.layout, self.world, self.world.size
        index = (done - 1) // self.every
        before = world.sent_bytes
        delta = layout.grads
        torch.sub(self.anchor, layout.params, out=delta)
        finite = all_finite(delta)
        report = self._report
        report[:] = 0.0
        if finite:
            torch.mul(delta, self._signs, out=self._signed[:layout.numel])
            # in float64 without a float64 copy of the delta (torch's casting sums make one)
            report[:SKETCH] = self._signed.numpy().reshape(-1, SKETCH).sum(0, dtype=np.float64)
            report[SKETCH] = float(np.dot(report[:SKETCH], report[:SKETCH]))
            report[SKETCH + 1] = kernels().norm(delta.numpy()) ** 2
        report[SKETCH + 2] = float(not finite)
        world.allreduce_(report)
        mean_sketch = report[:SKETCH] / size
        stats = {"delta_norm": math.sqrt(report[SKETCH + 1] / size),  # root mean square over ranks
                 "mean_delta_norm": math.sqrt(float(np.dot(mean_sketch, mean_sketch))),  # estimate of ||mean d_i||
                 "disagreement": max(0.0, report[SKETCH] / size - float(np.dot(mean_sketch, mean_sketch)))}
        if report[SKETCH + 2]:
            layout.params.copy_(self.anchor)  # nobody moves: nothing non-finite reaches the anchor
            layout.zero_grad()
            self.local_steps = 0
            return Round(index, True, world.sent_bytes - before, stats)
        delta.mul_(1.0 / size)
        layout.control.clear()
        self.compressor.aggregate(index)  # the shares of the deltas -> the (compressed) mean delta
        stats["sent_delta_norm"] = float(delta.norm())
        if self.momentum is None:
            self.anchor.sub_(delta)
        else:
            self.momentum.mul_(self.outer_momentum).add_(delta)
            self.anchor.add_(delta, alpha=-self.outer_lr).add_(self.momentum, alpha=-self.outer_lr * self.outer_momentum)
        layout.params.copy_(self.anchor)
        layout.zero_grad()
        self.local_steps = 0
        return Round(index, False, world.sent_bytes - before, {**stats, **self.compressor.stats})

    def outer_state(self) -> list[torch.Tensor]:
        """The outer optimizer's state (equal on every rank)."""
        return [] if self.momentum is None else [self.momentum]
