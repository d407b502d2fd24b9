"""How greedylore's rounds travel: the factors Q in the payload round, the sketch in the first."""
from __future__ import annotations

import numpy as np
import torch

from ..base import kernels
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


class TorchRounding:
    """The 16-bit rounds' arithmetic in torch operations, on any device. A line is a row of Q, a
    column of the sketch or a tensor of its tail; `line` gives each value's."""

    def peaks(self, x: torch.Tensor, line: torch.Tensor, peaks: torch.Tensor) -> None:
        """peaks (zeroed) = each line's largest |x| (NaN stays NaN)."""
        peaks.scatter_reduce_(0, line, x.abs(), "amax")

    def encode(self, x, line, scales, bound: int, ints, sent=None) -> None:
        """ints = round(x / s) on each value's line's scale s (0 where s is not positive), within
        +-bound if bound > 0; sent (if given) = ints * s, what this rank sends."""
        s = scales[line]
        v = torch.where(s > 0, x / s, 0.0).round_()
        ints.copy_(v.clamp_(-bound, bound) if bound else v)
        if sent is not None:
            torch.mul(ints, s, out=sent)

    def decode(self, ints, line, scales, out) -> None:
        torch.mul(ints, scales[line], out=out)

    def encode_pairs(self, x, line, scales, fines, bound: int, hi, lo) -> None:
        """x as hi on its line's scale s and lo, the remainder, on the fine scale f."""
        s, f = scales[line], fines[line]
        h = torch.where(s > 0, x / s, 0.0).round_().clamp_(-bound, bound)
        hi.copy_(h)
        lo.copy_(torch.where(s > 0, (x - h * s) / f, 0.0).round_().clamp_(-bound, bound))

    def decode_pairs(self, hi, lo, line, scales, fines, out) -> None:
        torch.add(hi * scales[line], lo * fines[line], out=out)


class CompiledRounding(TorchRounding):
    """The same arithmetic in one compiled pass each (`kernels.rounds`), the same bits: on the CPU a
    round's dozen small torch operations cost more than its values."""

    NONE = np.zeros(0, dtype=np.float32)

    def preload(self) -> None:
        """The five passes loaded from numba's cache now, not in the first 16-bit round (as
        `Products.preload`): each called once on no values."""
        x, line, ints = torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int16)
        self.peaks(x, line, x)
        self.encode(x, line, x, 1, ints)
        self.decode(ints, line, x, x)
        self.encode_pairs(x, line, x, x, 1, ints, ints)
        self.decode_pairs(ints, ints, line, x, x, x)

    def peaks(self, x, line, peaks):
        kernels().line_peaks(x.numpy(), line.numpy(), peaks.numpy())

    def encode(self, x, line, scales, bound, ints, sent=None):
        kernels().to_levels(x.numpy(), line.numpy(), scales.numpy(), bound, ints.numpy(),
                            self.NONE if sent is None else sent.numpy())

    def decode(self, ints, line, scales, out):
        kernels().from_levels(ints.numpy(), line.numpy(), scales.numpy(), out.numpy())

    def encode_pairs(self, x, line, scales, fines, bound, hi, lo):
        kernels().to_pairs(x.numpy(), line.numpy(), scales.numpy(), fines.numpy(), bound, hi.numpy(), lo.numpy())

    def decode_pairs(self, hi, lo, line, scales, fines, out):
        kernels().from_pairs(hi.numpy(), lo.numpy(), line.numpy(), scales.numpy(), fines.numpy(), out.numpy())


def levels(ranks: int) -> int:
    """The integer levels each rank may use so that the sum over `ranks` ranks fits int16 exactly."""
    return max(1, 32767 // ranks)


class Fp32Factors:
    """Q as fp32, summed exactly as linear compression sums: the uncompressed tensors ride with it."""

    dense_first = False  # the uncompressed tensors ride in the payload round
    linear = True

    def __init__(self, cap: list[int], D: list[int], wire, rounding: TorchRounding | None = None):
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

    def __init__(self, cap: list[int], D: list[int], wire, rounding: TorchRounding | None = None):
        self.wire, self.rounding = wire, rounding or TorchRounding()
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
        self.row = line_of(payload.views, "row", self.row_of, self.wire.device)
        head = int(payload.offsets[-1])
        q, peaks = payload.flat[:head], self.peaks[:rows]
        peaks.zero_()
        self.rounding.peaks(q, self.row, peaks)
        self.wire.allreduce_(peaks, op="max")
        torch.div(peaks, self.levels, out=self.scales[:rows])
        self.carved = self.ints.carve([tuple(v.shape) for v in payload.views])
        self.rounding.encode(q, self.row, self.scales, 0, self.carved.flat[:head], sent=q)

    def exchange(self, payload: Buffer, allreduce_with_dense) -> None:
        self.wire.allreduce_(self.carved.flat)  # exact integer sums, identical on every rank
        head = int(payload.offsets[-1])
        self.rounding.decode(self.carved.flat[:head], self.row, self.scales, payload.flat[:head])


class Fp32Sketch:
    """The first round (the tracking sketch x [W | Omega'], or the probes' projections) as fp32."""

    linear = True
    overlaps = True  # its Allreduce can start in backward, bucket by bucket

    def __init__(self, first_round: Buffer, tail_groups: list[int], wire, rounding: TorchRounding | None = None):
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

    def __init__(self, first_round: Buffer, tail_groups: list[int], wire, rounding: TorchRounding | None = None):
        """`first_round`: the buffer at its largest (every carving of it fits); `tail_groups`: the
        lengths of the tensors in its tail, each on a scale of its own."""
        self.wire, self.levels, self.rounding = wire, levels(wire.world.size), rounding or TorchRounding()
        head, columns = int(first_round.offsets[-1]), sum(v.shape[1] for v in first_round.views)
        self.groups = len(tail_groups)
        self.group_of = torch.repeat_interleave(torch.arange(self.groups, device=wire.device),
                                                torch.tensor(tail_groups, dtype=torch.int64, device=wire.device))
        self.ints = torch.zeros(head + 2 * first_round.tail.numel(), dtype=torch.int16, device=wire.device)
        self.peaks = torch.zeros(columns + self.groups, device=wire.device)
        self.scales, self.fines = torch.zeros_like(self.peaks), torch.zeros_like(self.peaks)
        self.plans: dict = {}

    @staticmethod
    def column_bytes(d: int) -> int:
        return 2 * d + 4  # the column and its peak

    @staticmethod
    def tail_bytes(groups: int) -> int:
        return 4 * groups  # each tensor's peak (a value goes as two int16: 4 bytes, as in fp32)

    def plan(self, buf: Buffer) -> tuple:
        """For a carving of the round: (each value's line: its column's number, then for the tail
        its tensor's, after the columns; the head's lines and the tail's; the values; the peaks,
        scales and fine scales in use; the integers sent; the head's length, the values'), kept per
        carving."""
        plan = self.plans.get(buf)
        if plan is None:
            columns = sum(v.shape[1] for v in buf.views)
            line = torch.cat([line_of(buf.views, "column", {}, self.wire.device),
                              columns + self.group_of[:buf.tail.numel()]])
            lines = columns + (self.groups if buf.tail.numel() else 0)
            head, n = int(buf.offsets[-1]), int(buf.offsets[-1]) + buf.tail.numel()
            if len(self.plans) >= 8:
                self.plans.clear()
            plan = self.plans[buf] = (line, line[:head], line[head:], buf.flat[:n], self.peaks[:lines],
                                      self.scales[:lines], self.fines[:lines], self.ints[:head + 2 * (n - head)],
                                      head, n)
        return plan

    def sum(self, buf: Buffer) -> None:
        """buf (its views, then the tail) summed over the ranks, in place, through int16 sums."""
        line, head_line, tail_line, values, peaks, scales, fines, ints, head, n = self.plan(buf)
        L, tail = self.levels, n - head
        peaks.zero_()
        self.rounding.peaks(values, line, peaks)  # each column's and tail tensor's peak (NaN stays NaN)
        self.wire.allreduce_(peaks, op="max")
        torch.div(peaks, L, out=scales)
        torch.div(scales, 2 * L, out=fines)
        self.rounding.encode(values[:head], head_line, scales, L, ints[:head])
        if tail:
            self.rounding.encode_pairs(values[head:], tail_line, scales, fines, L, ints[head:n], ints[n:])
        self.wire.allreduce_(ints)  # exact integer sums, identical on every rank
        self.rounding.decode(ints[:head], head_line, scales, values[:head])
        if tail:
            self.rounding.decode_pairs(ints[head:n], ints[n:], tail_line, scales, fines, values[head:])
