"""Bitstreams for the quantizers: whole arrays of codes per field, packed by compiled loops.

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

from .base import kernels as _kernels  # numba loads on the first stream, not with the package


class PayloadError(ValueError):
    """A payload that does not decode: truncated, extended or corrupted."""


def gamma_bits(v: np.ndarray) -> np.ndarray:
    """Length in bits of each Elias gamma code (v >= 1)."""
    return 2 * np.floor(np.log2(np.asarray(v, dtype=np.float64))).astype(np.int64) + 1


def rice_bits(v: np.ndarray, k: int) -> np.ndarray:
    return (np.asarray(v, dtype=np.int64) >> k) + 1 + k


def _codes(values) -> np.ndarray:
    return np.ascontiguousarray(np.atleast_1d(values), dtype=np.int64)


class BitWriter:
    def __init__(self, capacity_bits: int = 1 << 12):
        self.buf = np.zeros((capacity_bits + 7) // 8 + 8, dtype=np.uint8)
        self.nbits = 0

    def reserve(self, bits: int) -> None:
        """Room for `bits` more bits (the buffer doubles: appending stays linear)."""
        need = (self.nbits + bits + 7) // 8 + 8
        if need > self.buf.size:
            grown = np.zeros(max(need, 2 * self.buf.size), dtype=np.uint8)
            grown[: self.buf.size] = self.buf
            self.buf = grown

    def fixed(self, values, width: int):
        v = _codes(values)
        if not 0 <= width <= 63:
            raise ValueError(f"fixed fields are 0 to 63 bits wide, not {width}")
        self.body(_kernels().write_fixed, v.size * width, v, width)

    def unary(self, values):
        v = _codes(values)
        self.body(_kernels().write_unary, _kernels().unary_bits(v, 0), v)

    def gamma(self, values):
        v = _codes(values)
        bits = _kernels().gamma_bits(v)
        if bits < 0:
            raise ValueError("Elias gamma codes positive integers only")
        self.body(_kernels().write_gamma, bits, v)

    def rice(self, values, k: int):
        v = _codes(values)
        self.body(_kernels().write_rice, _kernels().unary_bits(v, k) + k * v.size, v, k)

    def body(self, kernel, bits: int, *args) -> None:
        """A codec's own compiled writer: kernel(buffer, position, *args) writes `bits` bits."""
        self.reserve(bits)
        self.nbits = kernel(self.buf, self.nbits, *args)

    def bytes(self) -> np.ndarray:
        return self.buf[: (self.nbits + 7) // 8].copy()


class BitReader:
    def __init__(self, data: np.ndarray):
        data = np.asarray(data, dtype=np.uint8).reshape(-1)
        self.buf = np.zeros(data.size + 16, dtype=np.uint8)  # room for the kernels' look-ahead
        self.buf[: data.size] = data
        self.nbits = 8 * data.size
        self.pos = 0

    def _advance(self, pos: int) -> None:
        if pos < 0:
            raise PayloadError(_kernels().ERRORS[pos])
        self.pos = pos

    def body(self, kernel, *args) -> None:
        """A codec's own compiled reader: kernel(buffer, nbits, position, *args) -> new position."""
        self._advance(kernel(self.buf, self.nbits, self.pos, *args))

    def fixed(self, count: int, width: int) -> np.ndarray:
        out = np.zeros(count, dtype=np.int64)
        self.body(_kernels().read_fixed, width, out)
        return out

    def unary(self, count: int, cap: int) -> np.ndarray:
        """`count` unary codes, each value at most `cap` (a corrupt run fails here, not later)."""
        out = np.empty(count, dtype=np.int64)
        self.body(_kernels().read_unary, cap, out)
        return out

    def gamma(self, count: int, cap_bits: int = 62) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        self.body(_kernels().read_gamma, cap_bits, out)
        return out

    def rice(self, count: int, k: int, cap: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        self.body(_kernels().read_rice, k, cap, out)
        return out

    def finish(self):
        """Every bit consumed, and the padding to the byte boundary is zero."""
        if not _kernels().padding_is_clean(self.buf, self.nbits, self.pos):
            raise PayloadError("payload has bits left over (extended or corrupted)")
