"""How greedylore's factors Q travel in the payload round."""
from __future__ import annotations

import torch

from ..buffer import Buffer


class Fp32Factors:
    """Q as fp32, summed exactly as linear compression sums: the uncompressed tensors ride with it."""

    dense_first = False  # the uncompressed tensors ride in the payload round
    linear = True

    def __init__(self, cap: list[int], D: list[int], wire):
        pass

    @staticmethod
    def row_bytes(D: int) -> int:
        return 4 * D

    def round(self, payload: Buffer, rows: int) -> None:
        """Q as it will be sent, in place."""

    def exchange(self, payload: Buffer, allreduce_with_dense) -> None:
        allreduce_with_dense(payload)


class Int16Factors:
    """Each row of Q as 16-bit integers on a scale every rank shares (one small max-Allreduce of
    the rows' peaks); each rank keeps within +-floor(32767 / ranks), so the integer sum can neither
    overflow nor round. Each rank rounds its own Q, so the trajectory depends on every residual,
    not on their sum only. The uncompressed tensors go in the first round, which is fp32."""

    dense_first = True
    linear = False

    def __init__(self, cap: list[int], D: list[int], wire):
        self.wire = wire
        self.levels = max(1, 32767 // wire.world.size)  # per rank, so that the sum of all ranks fits int16
        self.ints = Buffer([(c, n) for c, n in zip(cap, D)], dtype=torch.int16, device=wire.device)
        self.peaks, self.scales = torch.zeros(sum(cap), device=wire.device), torch.zeros(sum(cap), device=wire.device)
        self.carved: Buffer | None = None

    @staticmethod
    def row_bytes(D: int) -> int:
        return 2 * D + 4  # the row and its scale

    def round(self, payload: Buffer, rows: int) -> None:
        """payload's rows become what this rank sends, so error feedback keeps the rounding error
        exactly; their integers wait in `ints` for `exchange`."""
        peaks = self.peaks[:rows]
        at = 0
        for q in payload.views:
            torch.amax(q.abs(), dim=1, out=peaks[at:at + q.shape[0]])
            at += q.shape[0]
        self.wire.allreduce_(peaks, op="max")
        self.scales[:rows] = peaks / self.levels
        self.carved, at = self.ints.carve([tuple(q.shape) for q in payload.views]), 0
        for q, n in zip(payload.views, self.carved.views):
            scale = self.scales[at:at + q.shape[0], None]
            at += q.shape[0]
            n.copy_(torch.where(scale > 0, q / scale, 0.0).round_())
            torch.mul(n, scale, out=q)

    def exchange(self, payload: Buffer, allreduce_with_dense) -> None:
        self.wire.allreduce_(self.carved.flat)  # exact integer sums, identical on every rank
        at = 0
        for q, n in zip(payload.views, self.carved.views):
            torch.mul(n, self.scales[at:at + q.shape[0], None], out=q)
            at += q.shape[0]
