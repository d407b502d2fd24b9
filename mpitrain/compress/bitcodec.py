"""Bitstreams for the quantizers, vectorised with numpy (no Python loop per coordinate).

A stream is a sequence of fields, each a whole array of codes written at once:
  fixed(v, n)    every value in n bits, most significant first
  unary(v)       v ones then a zero: v + 1 bits each (written back to back)
  gamma(v)       Elias gamma for v >= 1, laid out as every value's length in unary, then every
                 value's bits below its leading one: 2*floor(log2 v) + 1 bits each, as Elias gamma
  rice(v, k)     Golomb-Rice for v >= 0: every quotient v >> k in unary, then every remainder in
                 k bits: (v >> k) + 1 + k bits each
Writing fields array by array (instead of value by value) keeps each code's exact length and
lets both ends work on whole arrays. The reader refuses anything that does not parse exactly:
running out of bits, a run longer than its cap, or bits left over.
"""
from __future__ import annotations

import numpy as np


class PayloadError(ValueError):
    """A payload that does not decode: truncated, extended or corrupted."""


def gamma_bits(v: np.ndarray) -> np.ndarray:
    """Length in bits of each Elias gamma code (v >= 1)."""
    return 2 * np.floor(np.log2(np.asarray(v, dtype=np.float64))).astype(np.int64) + 1


def rice_bits(v: np.ndarray, k: int) -> np.ndarray:
    return (np.asarray(v, dtype=np.int64) >> k) + 1 + k


def _word(width: int) -> np.dtype:
    """The smallest big-endian unsigned type holding `width` bits (its bytes are the bits in order)."""
    return np.dtype(">u1" if width <= 8 else ">u2" if width <= 16 else ">u4" if width <= 32 else ">u8")


def _bits_of(values: np.ndarray, width: np.ndarray | int) -> np.ndarray:
    """The low `width` bits of each value, most significant first, concatenated."""
    if np.isscalar(width) or np.ndim(width) == 0:
        w = int(width)
        values = np.asarray(values)
        if w == 0 or values.size == 0:
            return np.zeros(0, dtype=bool)
        if w == 1:
            return (values & 1).astype(bool)
        word = _word(w)
        # each value as big-endian bytes, unpacked: the last w bits of every row are its code
        raw = (values.astype(np.uint64) & np.uint64((1 << w) - 1)).astype(word).view(np.uint8)
        if w == 8 * word.itemsize:
            return np.unpackbits(raw).view(bool)
        rows = np.unpackbits(raw.reshape(values.size, word.itemsize), axis=1)
        return rows[:, 8 * word.itemsize - w:].reshape(-1).view(bool)
    values = np.asarray(values, dtype=np.uint64)
    width = np.asarray(width, dtype=np.int64)
    total = int(width.sum())
    if total == 0:
        return np.zeros(0, dtype=bool)
    owner = np.repeat(np.arange(values.size), width)
    ends = np.cumsum(width)
    shift = (ends[owner] - 1 - np.arange(total)).astype(np.uint64)
    return ((values[owner] >> shift) & np.uint64(1)).astype(bool)


class BitWriter:
    def __init__(self):
        self._parts: list[np.ndarray] = []
        self.nbits = 0

    def _add(self, bits: np.ndarray):
        self._parts.append(bits)
        self.nbits += bits.size

    def fixed(self, values, width: int):
        self._add(_bits_of(np.atleast_1d(values), width))

    def unary(self, values):
        v = np.asarray(values, dtype=np.int64)
        bits = np.ones(int(v.sum()) + v.size, dtype=bool)
        bits[np.cumsum(v + 1) - 1] = False
        self._add(bits)

    def gamma(self, values):
        v = np.asarray(values, dtype=np.int64)
        if (v < 1).any():
            raise ValueError("Elias gamma codes positive integers only")
        n = gamma_bits(v) // 2
        self.unary(n)
        self._add(_bits_of(v, n))

    def rice(self, values, k: int):
        v = np.asarray(values, dtype=np.int64)
        self.unary(v >> k)
        self._add(_bits_of(v & ((1 << k) - 1), k))

    def bytes(self) -> np.ndarray:
        bits = np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=bool)
        return np.packbits(bits)


class BitReader:
    def __init__(self, data: np.ndarray, nbits: int | None = None):
        self.bits = np.unpackbits(np.asarray(data, dtype=np.uint8)).astype(bool)
        self.pos = 0

    def _take(self, n: int) -> np.ndarray:
        if self.pos + n > self.bits.size:
            raise PayloadError("payload is truncated")
        out = self.bits[self.pos:self.pos + n]
        self.pos += n
        return out

    def fixed(self, count: int, width: int) -> np.ndarray:
        if width == 0:
            return np.zeros(count, dtype=np.int64)
        word = _word(width)
        if width == 1:
            return self._take(count).astype(np.int64)
        if width == 8 * word.itemsize:
            return np.packbits(self._take(count * width)).view(word).astype(np.int64)
        rows = np.zeros((count, 8 * word.itemsize), dtype=bool)  # left-padded to whole bytes
        rows[:, 8 * word.itemsize - width:] = self._take(count * width).reshape(count, width)
        return np.packbits(rows, axis=1).view(word).reshape(count).astype(np.int64)

    def unary(self, count: int, cap: int) -> np.ndarray:
        """`count` unary codes, each value at most `cap` (a corrupt run fails here, not later)."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        window = self.bits[self.pos:self.pos + count * (cap + 1)]
        zeros = np.flatnonzero(~window)
        if zeros.size < count:
            raise PayloadError("payload is truncated or holds a run longer than allowed")
        ends = zeros[:count]
        values = np.diff(np.concatenate([[-1], ends])) - 1
        if (values > cap).any():
            raise PayloadError("payload holds a run longer than allowed")
        self.pos += int(ends[-1]) + 1
        return values

    def gamma(self, count: int, cap_bits: int = 62) -> np.ndarray:
        n = self.unary(count, cap_bits)
        total = int(n.sum())
        low = self._take(total)
        values = np.ones(count, dtype=np.uint64) << n.astype(np.uint64)
        if total:
            owner = np.repeat(np.arange(count), n)
            ends = np.cumsum(n)
            shift = (ends[owner] - 1 - np.arange(total)).astype(np.uint64)
            np.add.at(values, owner, low.astype(np.uint64) << shift)
        return values.astype(np.int64)

    def rice(self, count: int, k: int, cap: int) -> np.ndarray:
        q = self.unary(count, cap >> k)
        return (q << k) | self.fixed(count, k)

    def finish(self):
        """Every bit consumed, and the padding to the byte boundary is zero."""
        rest = self.bits[self.pos:]
        if rest.size >= 8 or rest.any():
            raise PayloadError("payload has bits left over (extended or corrupted)")
