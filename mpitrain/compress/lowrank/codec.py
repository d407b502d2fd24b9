"""How greedylore's rounds travel: the factors Q in the payload round, the sketch in the first."""
from __future__ import annotations

import torch

from ..buffer import Buffer


def line_of(views: list[torch.Tensor], by: str, cache: dict, device) -> torch.Tensor:
    """For each value of `views` (consecutive in one buffer), the number of its row (by="row") or
    column (by="column") counted over all views: a round quantised on per-line scales in a few
    operations rather than a few per matrix. Cached per carving in `cache`."""
    key = tuple(tuple(v.shape) for v in views)
    if key not in cache:
        if len(cache) >= 8:
            cache.clear()
        parts, at = [], 0
        for v in views:
            rows, cols = v.shape
            if by == "row":
                parts.append(torch.arange(at, at + rows, device=device).repeat_interleave(cols))
                at += rows
            else:
                parts.append(torch.arange(at, at + cols, device=device).repeat(rows))
                at += cols
        cache[key] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)
    return cache[key]


def levels(ranks: int) -> int:
    """The integer levels each rank may use so that the sum over `ranks` ranks fits int16 exactly."""
    return max(1, 32767 // ranks)


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
        self.levels = levels(wire.world.size)
        self.ints = Buffer([(c, n) for c, n in zip(cap, D)], dtype=torch.int16, device=wire.device)
        self.peaks, self.scales = torch.zeros(sum(cap), device=wire.device), torch.zeros(sum(cap), device=wire.device)
        self.carved: Buffer | None = None
        self.row_of: dict = {}

    @staticmethod
    def row_bytes(D: int) -> int:
        return 2 * D + 4  # the row and its scale

    def round(self, payload: Buffer, rows: int) -> None:
        """payload's rows become what this rank sends, so error feedback keeps the rounding error
        exactly; their integers wait in `ints` for `exchange`."""
        row = line_of(payload.views, "row", self.row_of, self.wire.device)
        head = int(payload.offsets[-1])
        q, peaks = payload.flat[:head], self.peaks[:rows]
        peaks.zero_()
        peaks.scatter_reduce_(0, row, q.abs(), "amax")  # each row's peak (NaN stays NaN)
        self.wire.allreduce_(peaks, op="max")
        self.scales[:rows] = peaks / self.levels
        self.carved = self.ints.carve([tuple(v.shape) for v in payload.views])
        self.scale = self.scales[row]  # each value's row's scale
        ints = self.carved.flat[:head]
        ints.copy_(torch.where(self.scale > 0, q / self.scale, 0.0).round_())
        torch.mul(ints, self.scale, out=q)

    def exchange(self, payload: Buffer, allreduce_with_dense) -> None:
        self.wire.allreduce_(self.carved.flat)  # exact integer sums, identical on every rank
        torch.mul(self.carved.flat[:int(payload.offsets[-1])], self.scale, out=payload.flat[:int(payload.offsets[-1])])


class Fp32Sketch:
    """The first round (the tracking sketch x [W | Omega'], or the probes' projections) as fp32."""

    linear = True
    overlaps = True  # its Allreduce can start in backward, bucket by bucket

    def __init__(self, first_round: Buffer, tail_groups: list[int], wire):
        pass

    @staticmethod
    def column_bytes(d: int) -> int:
        return 4 * d

    @staticmethod
    def tail_bytes(groups: int) -> int:
        """What the round sends for its tail beyond the tensors' own 4 bytes a value."""
        return 0


class Int16Sketch:
    """The first round as 16-bit integers. Each column of the sketch goes on a scale every rank
    shares (one small max-Allreduce of the columns' peaks, the tail's with them); the uncompressed
    tensors in the tail, which are gradient, go as fixed-point pairs: hi on the tensor's scale s, lo
    the remainder on s / 2L, so each value keeps about 2 log2(2L) bits of its tensor's peak (L: the
    levels a rank may use). The integer sums are exact, so every rank decodes the same sketch, and
    the bases stay the same bits everywhere; the sketch's rounding only moves which directions are
    chosen, so no error feedback keeps it. Its scales must be agreed before the round, so it does
    not start in backward."""

    linear = False
    overlaps = False

    def __init__(self, first_round: Buffer, tail_groups: list[int], wire):
        """`first_round`: the buffer at its largest (every carving of it fits); `tail_groups`: the
        lengths of the tensors in its tail, each on a scale of its own."""
        self.wire, self.levels = wire, levels(wire.world.size)
        head, columns = int(first_round.offsets[-1]), sum(v.shape[1] for v in first_round.views)
        self.groups = torch.tensor(tail_groups, dtype=torch.int64, device=wire.device)
        self.group_of = torch.repeat_interleave(torch.arange(len(tail_groups), device=wire.device), self.groups)
        self.ints = torch.zeros(head + 2 * first_round.tail.numel(), dtype=torch.int16, device=wire.device)
        self.peaks = torch.zeros(columns + len(tail_groups), device=wire.device)
        self.column_of: dict = {}

    @staticmethod
    def column_bytes(d: int) -> int:
        return 2 * d + 4  # the column and its peak

    @staticmethod
    def tail_bytes(groups: int) -> int:
        return 4 * groups  # each tensor's peak (a value goes as two int16: 4 bytes, as in fp32)

    def sum(self, buf: Buffer) -> None:
        """buf (its views, then the tail) summed over the ranks, in place, through int16 sums."""
        column = line_of(buf.views, "column", self.column_of, self.wire.device)
        columns = sum(v.shape[1] for v in buf.views)
        head, tail, groups = int(buf.offsets[-1]), buf.tail, len(self.groups) if buf.tail.numel() else 0
        values = buf.flat[:head]
        peaks = self.peaks[:columns + groups]
        peaks[:columns] = 0.0
        peaks[:columns].scatter_reduce_(0, column, values.abs(), "amax")  # each column's peak (NaN stays NaN)
        if groups:
            peaks[columns:] = torch.segment_reduce(tail.abs(), "max", lengths=self.groups)
        self.wire.allreduce_(peaks, op="max")
        scales, L = peaks / self.levels, self.levels
        ints = self.ints[:head + 2 * tail.numel()]
        s = scales[column]  # each value's column's scale
        ints[:head].copy_(torch.where(s > 0, values / s, 0.0).round_().clamp_(-L, L))
        if groups:
            t = scales[columns:][self.group_of]  # each tail value's tensor's scale
            fine = t / (2 * L)
            hi = torch.where(t > 0, tail / t, 0.0).round_().clamp_(-L, L)
            lo = torch.where(t > 0, (tail - hi * t) / fine, 0.0).round_().clamp_(-L, L)
            ints[head:head + tail.numel()].copy_(hi)
            ints[head + tail.numel():].copy_(lo)
        self.wire.allreduce_(ints)  # exact integer sums, identical on every rank
        torch.mul(ints[:head], s, out=values)
        if groups:
            torch.add(ints[head:head + tail.numel()] * t, ints[head + tail.numel():] * fine, out=tail)
