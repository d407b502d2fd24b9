"""Bit fields of `bitcodec`: writers OR bits into a zeroed byte buffer at a bit position and return
the new position (the caller has made the buffer large enough); readers return the new position,
or a negative error code: TRUNCATED when the bits run out, TOO_LONG when a unary run passes its cap."""
from __future__ import annotations

import numpy as np

from .common import NOT_POSITIVE, TOO_LONG, TRUNCATED, U, inline, jit


# -- fields -------------------------------------------------------------------------------------------
# Writing goes through a bit accumulator (acc holds n < 32 pending bits, `out` is the next byte to
# fill) flushed 32 bits at a time; reading peeks a few bytes at a bit position. The reader's buffer
# carries 8 zero bytes past its end so a peek never leaves it; `nbits` is where the data ends.



@inline
def _start(buf, pos):
    """The accumulator at bit position pos: the bits already in its byte, pending."""
    out, n = pos >> 3, pos & 7
    return (np.int64(buf[out]) >> (8 - n)) if n else np.int64(0), n, out


@inline
def _push(buf, acc, n, out, value, width):
    """Append value (< 2^width, width <= 32)."""
    acc = (acc << width) | value
    n += width
    if n >= 32:
        n -= 32
        word = acc >> n
        buf[out] = (word >> 24) & 0xFF
        buf[out + 1] = (word >> 16) & 0xFF
        buf[out + 2] = (word >> 8) & 0xFF
        buf[out + 3] = word & 0xFF
        out += 4
        acc &= (np.int64(1) << n) - 1
    return acc, n, out


@inline
def _push_wide(buf, acc, n, out, value, width):
    """Append value (< 2^width, width <= 63)."""
    if width > 32:
        acc, n, out = _push(buf, acc, n, out, value >> 32, width - 32)
        value, width = value & 0xFFFFFFFF, 32
    return _push(buf, acc, n, out, value, width)


@inline
def _push_unary(buf, acc, n, out, run):
    """run ones, then a zero."""
    while run >= 32:
        acc, n, out = _push(buf, acc, n, out, 0xFFFFFFFF, 32)
        run -= 32
    return _push(buf, acc, n, out, ((np.int64(1) << run) - 1) << 1, run + 1)


@inline
def _end(buf, acc, n, out):
    """Flush the pending bits (the last byte padded with zeros); the new bit position."""
    while n >= 8:
        n -= 8
        buf[out] = (acc >> n) & 0xFF
        out += 1
    if n:
        buf[out] = (acc << (8 - n)) & 0xFF
    return out * 8 + n


# Reading keeps up to 64 upcoming bits in `acc`, most significant first (`have` of them valid), and
# loads 4 bytes at `inp` whenever fewer than 32 are left; the position is 8 * inp - have.



@inline
def _refill(buf, acc, have, inp):
    if have < 32:
        word = (U(buf[inp]) << U(24)) | (U(buf[inp + 1]) << U(16)) | (U(buf[inp + 2]) << U(8)) | U(buf[inp + 3])
        acc |= word << U(32 - have)
        have += 32
        inp += 4
    return acc, have, inp


@inline
def _rstart(buf, pos):
    acc, have, inp = _refill(buf, U(0), 0, pos >> 3)
    return acc << U(pos & 7), have - (pos & 7), inp


@inline
def _take(buf, acc, have, inp, width):
    """(the next `width` (<= 32) bits as an integer, state)."""
    acc, have, inp = _refill(buf, acc, have, inp)
    value = np.int64((acc >> U(1)) >> U(63 - width))  # two shifts: width 0 reads 0
    return value, acc << U(width), have - width, inp


@inline
def _take_wide(buf, acc, have, inp, width):
    """The next `width` (<= 63) bits."""
    if width <= 32:
        return _take(buf, acc, have, inp, width)
    high, acc, have, inp = _take(buf, acc, have, inp, width - 32)
    low, acc, have, inp = _take(buf, acc, have, inp, 32)
    return (high << 32) | low, acc, have, inp


def _leading_ones_table():
    table = np.zeros(256, dtype=np.int64)
    for b in range(256):
        while table[b] < 8 and b & (0x80 >> table[b]):
            table[b] += 1
    return table


LEADING_ONES = _leading_ones_table()


@inline
def _take_run(buf, acc, have, inp, cap):
    """(ones before the next zero, or TOO_LONG past cap; state after that zero). Past the end of the
    data the padding's zeros end a run: the caller compares the position with nbits."""
    run = 0
    while True:
        acc, have, inp = _refill(buf, acc, have, inp)
        ones = LEADING_ONES[acc >> U(56)]
        run += ones
        if ones < 8:
            acc, have = acc << U(ones + 1), have - ones - 1
            break
        acc, have = acc << U(8), have - 8
        if run > cap:
            break
    return (run if run <= cap else TOO_LONG), acc, have, inp


@inline
def _floor_log2(v):
    n = 0
    while v >> (n + 1):
        n += 1
    return n


@jit
def write_fixed(buf, pos, values, width):
    """The low `width` bits of each value."""
    acc, n, out = _start(buf, pos)
    mask = (np.int64(1) << width) - 1
    for v in values:
        acc, n, out = _push_wide(buf, acc, n, out, v & mask, width)
    return _end(buf, acc, n, out)


@jit
def write_unary(buf, pos, values):
    acc, n, out = _start(buf, pos)
    for v in values:
        acc, n, out = _push_unary(buf, acc, n, out, v)
    return _end(buf, acc, n, out)


@jit
def write_gamma(buf, pos, values):
    """Every value's length in unary, then every value's bits below its leading one."""
    acc, n, out = _start(buf, pos)
    for v in values:
        acc, n, out = _push_unary(buf, acc, n, out, _floor_log2(v))
    for v in values:
        width = _floor_log2(v)
        acc, n, out = _push_wide(buf, acc, n, out, v & ((np.int64(1) << width) - 1), width)
    return _end(buf, acc, n, out)


@jit
def write_rice(buf, pos, values, k):
    acc, n, out = _start(buf, pos)
    for v in values:
        acc, n, out = _push_unary(buf, acc, n, out, v >> k)
    mask = (np.int64(1) << k) - 1
    for v in values:
        acc, n, out = _push_wide(buf, acc, n, out, v & mask, k)
    return _end(buf, acc, n, out)


@jit
def unary_bits(values, shift):
    total = 0
    for v in values:
        total += (v >> shift) + 1
    return total


@jit
def gamma_bits(values):
    """Total bits of the values' Elias gamma codes, or NOT_POSITIVE if a value is below 1."""
    total = 0
    for v in values:
        if v < 1:
            return NOT_POSITIVE
        total += 2 * _floor_log2(v) + 1
    return total


@jit
def read_fixed(buf, nbits, pos, width, out):
    if pos + width * out.size > nbits:
        return TRUNCATED
    acc, have, inp = _rstart(buf, pos)
    for i in range(out.size):
        out[i], acc, have, inp = _take_wide(buf, acc, have, inp, width)
    return 8 * inp - have


@jit
def read_unary(buf, nbits, pos, cap, out):
    acc, have, inp = _rstart(buf, pos)
    for i in range(out.size):
        out[i], acc, have, inp = _take_run(buf, acc, have, inp, cap)
        if 8 * inp - have > nbits:
            return TRUNCATED
        if out[i] < 0:
            return TOO_LONG
    return 8 * inp - have


@jit
def read_gamma(buf, nbits, pos, cap_bits, out):
    pos = read_unary(buf, nbits, pos, cap_bits, out)
    if pos < 0:
        return pos
    total = 0
    for width in out:
        total += width
    if pos + total > nbits:
        return TRUNCATED
    acc, have, inp = _rstart(buf, pos)
    for i in range(out.size):
        low, acc, have, inp = _take_wide(buf, acc, have, inp, out[i])
        out[i] = (np.int64(1) << out[i]) | low
    return 8 * inp - have


@jit
def read_rice(buf, nbits, pos, k, cap, out):
    pos = read_unary(buf, nbits, pos, cap >> k, out)
    if pos < 0:
        return pos
    if pos + k * out.size > nbits:
        return TRUNCATED
    acc, have, inp = _rstart(buf, pos)
    for i in range(out.size):
        low, acc, have, inp = _take_wide(buf, acc, have, inp, k)
        out[i] = (out[i] << k) | low
    return 8 * inp - have


@jit
def padding_is_clean(buf, nbits, pos):
    """Fewer than 8 bits left, all of them zero."""
    acc, have, inp = _rstart(buf, pos)
    return nbits - pos < 8 and _take(buf, acc, have, inp, nbits - pos)[0] == 0
