"""Compiled loops (numba): the fields of `bitcodec`, the quantizers' fused passes, and the low-rank
compressors' skinny products, residual-and-reconstruction pass and basis pass.

Imported on first use, so a run that neither quantizes nor compresses to low rank never loads
numba. Everything here is plain IEEE arithmetic in a fixed order (no fastmath), so the codes are
those of the array formulas they replace, with one exception: `right_product`'s dot products
(see `reassociating`). Kernels compile once per machine (cache=True) into __pycache__.

Writers OR bits into a zeroed byte buffer at a bit position and return the new position; the caller
has made the buffer large enough. Readers return the new position, or a negative error code:
TRUNCATED when the bits run out, TOO_LONG when a unary run passes its cap.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

TRUNCATED, TOO_LONG, NOT_POSITIVE, PAST_END, BAD_CODE = -1, -2, -3, -4, -5
ERRORS = {TRUNCATED: "payload is truncated", TOO_LONG: "payload holds a run longer than allowed",
          PAST_END: "the support runs past the end of the tensor", BAD_CODE: "payload holds a code that is not used"}
jit = njit(cache=True, nogil=True, _nrt=False)


# -- fields -------------------------------------------------------------------------------------------
# Writing goes through a bit accumulator (acc holds n < 32 pending bits, `out` is the next byte to
# fill) flushed 32 bits at a time; reading peeks a few bytes at a bit position. The reader's buffer
# carries 8 zero bytes past its end so a peek never leaves it; `nbits` is where the data ends.

# No reference counting (_nrt=False): an incref/decref of the buffer per helper call costs 10x.
# Kernels therefore never allocate: scratch arrays come from the caller.
inline = njit(cache=True, inline="always", _nrt=False)


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

U = np.uint64


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


# -- quantizers' fused passes ---------------------------------------------------------------------------

@jit
def stochastic_levels(x, times, over, u, cap, k):
    """k = floor(r) + [u < r - floor(r)] with r = |x| * times / over (float64, in that order), at
    most cap. An empty u rounds to the nearest level instead."""
    for i in range(x.size):
        r = np.float64(abs(x[i])) * times / over
        if u.size:
            level = np.floor(r)
            level += u[i] < r - level
        else:
            level = np.floor(r + 0.5)
        k[i] = min(np.int64(level), cap)


@jit
def scaled_signed(gamma, k, x, y):
    """y = sign(x) * gamma * k in float32 (the decoded values), +0 where k is 0."""
    for i in range(k.size):
        mag = gamma * np.float32(k[i])
        y[i] = (-mag if x[i] < 0 else mag) if k[i] else np.float32(0)


@jit
def positions(k, nonzero_at, zero_at):
    """Where the levels are nonzero and where zero (each list in order, gathered without a branch
    per value: whether a level is zero is a coin flip the branch predictor would lose); returns
    (number of nonzeros, sum of the levels)."""
    nnz = zeros = total = 0
    for i in range(k.size):
        nonzero_at[nnz] = i
        zero_at[zeros] = i
        nnz += k[i] != 0
        zeros += k[i] == 0
        total += k[i]
    return nnz, total


@jit
def rice_gap_bits(marked, param):
    """Rice bits of the gaps before each of these increasing positions (from -1)."""
    bits, last = 0, -1
    for i in marked:
        bits += ((i - last - 1) >> param) + 1 + param
        last = i
    return bits


@jit
def write_levels(buf, pos, x, k, marked, param, nonzero_at):
    """Sparse dithering's body: the support as Rice-coded gaps before the marked positions (the
    zeros or the nonzeros), then a sign bit per nonzero, then each nonzero level k in unary as k - 1."""
    acc, n, out = _start(buf, pos)
    last = -1
    for i in marked:
        acc, n, out = _push_unary(buf, acc, n, out, (i - last - 1) >> param)
        last = i
    last, mask = -1, (np.int64(1) << param) - 1
    for i in marked:
        acc, n, out = _push_wide(buf, acc, n, out, (i - last - 1) & mask, param)
        last = i
    for i in nonzero_at:
        acc, n, out = _push(buf, acc, n, out, np.int64(x[i] < 0), 1)
    for i in nonzero_at:
        acc, n, out = _push_unary(buf, acc, n, out, k[i] - 1)
    return _end(buf, acc, n, out)


@jit
def read_levels(buf, nbits, pos, zeros_marked, param, run_cap, gamma, marked, flags, index, y):
    """The inverse of write_levels into y (zeroed, size d): the decoded values. Scratch: marked (one
    per coded gap), flags (d when zeros are marked), index (one per nonzero, and one spare)."""
    d = y.size
    pos = read_rice(buf, nbits, pos, param, d, marked)
    if pos < 0:
        return pos
    at = -1
    for j in range(marked.size):  # gaps to positions
        at += marked[j] + 1
        marked[j] = at
    if marked.size and at >= d:
        return PAST_END
    if zeros_marked:  # the nonzeros are the rest, gathered without a branch per value
        flags[:] = True
        for j in marked:
            flags[j] = False
        nnz = 0
        for i in range(d):
            index[nnz] = i
            nnz += flags[i]
    else:
        nnz = marked.size
        for j in range(nnz):
            index[j] = marked[j]
    if pos + nnz > nbits:
        return TRUNCATED
    sign_acc, sign_have, sign_inp = _rstart(buf, pos)
    acc, have, inp = _rstart(buf, pos + nnz)
    for j in range(nnz):
        run, acc, have, inp = _take_run(buf, acc, have, inp, run_cap)
        if 8 * inp - have > nbits:
            return TRUNCATED
        if run < 0:
            return run
        negative, sign_acc, sign_have, sign_inp = _take(buf, sign_acc, sign_have, sign_inp, 1)
        mag = gamma * np.float32(run + 1)
        y[index[j]] = -mag if negative else mag
    return 8 * inp - have


@jit
def write_sparse_gamma(buf, pos, x, k):
    """QSGD's body: gamma(gap + 1) per nonzero level, a sign bit per nonzero, gamma(level) per nonzero."""
    acc, n, out = _start(buf, pos)
    last = -1
    for i in range(k.size):
        if k[i]:
            acc, n, out = _push_unary(buf, acc, n, out, _floor_log2(i - last))
            last = i
    last = -1
    for i in range(k.size):
        if k[i]:
            width = _floor_log2(i - last)
            acc, n, out = _push_wide(buf, acc, n, out, (i - last) & ((np.int64(1) << width) - 1), width)
            last = i
    for i in range(k.size):
        if k[i]:
            acc, n, out = _push(buf, acc, n, out, np.int64(x[i] < 0), 1)
    for i in range(k.size):
        if k[i]:
            acc, n, out = _push_unary(buf, acc, n, out, _floor_log2(k[i]))
    for i in range(k.size):
        if k[i]:
            width = _floor_log2(k[i])
            acc, n, out = _push_wide(buf, acc, n, out, k[i] & ((np.int64(1) << width) - 1), width)
    return _end(buf, acc, n, out)


@jit
def sparse_gamma_bits(k):
    bits, last = 0, -1
    for i in range(k.size):
        if k[i]:
            bits += 2 * _floor_log2(i - last) + 1 + 1 + 2 * _floor_log2(k[i]) + 1
            last = i
    return bits


@jit
def natural_codes(bits, u, codes):
    """Exponent + [u * 2^23 < mantissa] from each float32's bits; BAD_CODE if |x| >= 2^127."""
    for i in range(bits.size):
        exponent = (bits[i] >> 23) & 0xFF
        if exponent >= 254:
            return BAD_CODE
        codes[i] = exponent + (u[i] * 8388608.0 < (bits[i] & 0x7FFFFF))
    return 0


@jit
def write_natural(buf, pos, bits, codes):
    """Every sign bit, then every 8-bit code."""
    acc, n, out = _start(buf, pos)
    for i in range(bits.size):
        acc, n, out = _push(buf, acc, n, out, np.int64(bits[i] >> 31), 1)
    for i in range(codes.size):
        acc, n, out = _push(buf, acc, n, out, codes[i], 8)
    return _end(buf, acc, n, out)


@jit
def read_natural(buf, nbits, pos, out):
    """out (uint32, size d): the float32 bits sign * 2^(code - 127), 0 for code 0; BAD_CODE for 255."""
    d = out.size
    if pos + 9 * d > nbits:
        return TRUNCATED
    sign_acc, sign_have, sign_inp = _rstart(buf, pos)
    acc, have, inp = _rstart(buf, pos + d)
    for i in range(d):
        code, acc, have, inp = _take(buf, acc, have, inp, 8)
        if code == 255:
            return BAD_CODE
        negative, sign_acc, sign_have, sign_inp = _take(buf, sign_acc, sign_have, sign_inp, 1)
        out[i] = np.uint32((negative << 31) | (code << 23))
    return pos + 9 * d


@jit
def accumulate(total, values):
    """total += values, each float32 value widened to float64 first: numpy's mixed-type add took 6x
    as long (buffered casts), torch's longer still."""
    for i in range(values.size):
        total[i] += np.float64(values[i])


@jit
def narrow(total, out):
    """out = total rounded to float32 (to nearest, as numpy's cast), 4x faster than numpy's."""
    for i in range(total.size):
        out[i] = np.float32(total[i])


# -- spherical compression's candidate search -------------------------------------------------------------

@inline
def _mix(x):
    """SplitMix64's finaliser, as quantize._mix (uint64 arithmetic wraps)."""
    x = x + U(0x9E3779B97F4A7C15)
    x = (x ^ (x >> U(30))) * U(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> U(27))) * U(0x94D049BB133111EB)
    return x ^ (x >> U(31))


@inline
def _uniform(base, counter):
    return np.float64(_mix(base ^ _mix(U(counter))) >> U(11)) * 2.0 ** -53


@jit
def spherical_first(units, bases, starts, cap, floor, found, phase, weight):
    """For each block (row of units: x / ||x||, float64), the first t in [starts[b], cap] whose
    candidate (quantize.candidates) has cosine with the block >= floor, or 0. `floor` sits a little
    below the acceptance threshold: the exact test in float arithmetic runs on what this returns.

    Most candidates are rejected from their angles alone (m even): pair j of a candidate is
    r_j (cos theta_j, sin theta_j) on coordinates (j, j + m/2), where the block has norm rho_j and
    angle phi_j. By Cauchy-Schwarz the cosine is at most sqrt(sum_j rho_j^2 max(0, cos D_j)^2),
    D_j = theta_j - phi_j, so a hit needs sum_j rho_j^2 (1 - max(0, cos D_j)^2) <= 1 - floor^2, and
    1 - max(0, cos D)^2 >= sin(|D|)^2 >= (|D| - |D|^3 / 6)^2 while |D| <= pi/2 (1 beyond): no
    logarithm, sine or cosine until a candidate passes that. Scratch: phase, weight (one per pair)."""
    blocks, m = units.shape
    pairs = (m + 1) // 2
    budget = 1.0 - floor * floor + 1e-9  # rounding in the phases and weights is far below 1e-9
    for b in range(blocks):
        found[b] = 0
        if m % 2 == 0:
            for j in range(pairs):
                phase[j] = np.arctan2(units[b, j + pairs], units[b, j])
                weight[j] = units[b, j] ** 2 + units[b, j + pairs] ** 2
        t = starts[b]
        while 0 < t <= cap:
            counter = t * 2 * pairs
            if m % 2 == 0:
                miss = 0.0
                for j in range(pairs):
                    gap = abs(2 * np.pi * _uniform(bases[b], counter + 2 * j + 1) - phase[j])
                    gap = min(gap, 2 * np.pi - gap)
                    low = gap - gap * gap * gap / 6 if gap <= np.pi / 2 else 1.0
                    miss += weight[j] * min(low * low, 1.0)
                if miss > budget:
                    t += 1
                    continue
            dot = norm2 = 0.0
            for j in range(pairs):
                radius = np.sqrt(-2.0 * np.log1p(-_uniform(bases[b], counter + 2 * j)))
                angle = 2 * np.pi * _uniform(bases[b], counter + 2 * j + 1)
                c = radius * np.cos(angle)
                dot += c * units[b, j]
                norm2 += c * c
                if j + pairs < m:
                    s = radius * np.sin(angle)
                    dot += s * units[b, j + pairs]
                    norm2 += s * s
            if dot >= floor * np.sqrt(norm2):
                found[b] = t
                break
            t += 1


@jit
def norm(x):
    """sqrt(sum x_i^2) in float64 (no overflow or underflow for float32 input), summed in 4 lanes
    combined in a fixed order: the same bits on every machine, unlike a BLAS dot whose order
    changes with its kernel and thread count."""
    a = b = c = e = 0.0
    head = x.size - x.size % 4
    for i in range(0, head, 4):
        a += np.float64(x[i]) * np.float64(x[i])
        b += np.float64(x[i + 1]) * np.float64(x[i + 1])
        c += np.float64(x[i + 2]) * np.float64(x[i + 2])
        e += np.float64(x[i + 3]) * np.float64(x[i + 3])
    for i in range(head, x.size):
        a += np.float64(x[i]) * np.float64(x[i])
    return np.sqrt((a + b) + (c + e))


# -- low-rank ----------------------------------------------------------------------------------------
@inline
def _add_products(row, left, right, i, sign):
    """row += sign * left[i] @ right, four of right's rows per sweep of `row` (one load and store
    of it per four products instead of per product)."""
    m, r = row.shape[0], left.shape[1]
    k = 0
    while k + 4 <= r:
        a0, a1, a2, a3 = sign * left[i, k], sign * left[i, k + 1], sign * left[i, k + 2], sign * left[i, k + 3]
        s0, s1, s2, s3 = right[k], right[k + 1], right[k + 2], right[k + 3]
        for j in range(m):
            row[j] += a0 * s0[j] + a1 * s1[j] + a2 * s2[j] + a3 * s3[j]
        k += 4
    while k < r:
        a, s = sign * left[i, k], right[k]
        for j in range(m):
            row[j] += a * s[j]
        k += 1


@inline
def _add_4x4(o0, o1, o2, o3, v0, v1, v2, v3, coef, row, col, sign):
    """o_q += sum_p sign * coef[row + q, col + p] * v_p for q, p < 4: four output rows against one
    sweep of four input rows, whose loads they share; each output's sum in a fixed order."""
    a0, a1 = sign * coef[row, col], sign * coef[row, col + 1]
    a2, a3 = sign * coef[row, col + 2], sign * coef[row, col + 3]
    b0, b1 = sign * coef[row + 1, col], sign * coef[row + 1, col + 1]
    b2, b3 = sign * coef[row + 1, col + 2], sign * coef[row + 1, col + 3]
    c0, c1 = sign * coef[row + 2, col], sign * coef[row + 2, col + 1]
    c2, c3 = sign * coef[row + 2, col + 2], sign * coef[row + 2, col + 3]
    d0, d1 = sign * coef[row + 3, col], sign * coef[row + 3, col + 1]
    d2, d3 = sign * coef[row + 3, col + 2], sign * coef[row + 3, col + 3]
    for j in range(o0.shape[0]):
        w0, w1, w2, w3 = v0[j], v1[j], v2[j], v3[j]
        o0[j] += a0 * w0 + a1 * w1 + a2 * w2 + a3 * w3
        o1[j] += b0 * w0 + b1 * w1 + b2 * w2 + b3 * w3
        o2[j] += c0 * w0 + c1 * w1 + c2 * w2 + c3 * w3
        o3[j] += d0 * w0 + d1 * w1 + d2 * w2 + d3 * w3


@inline
def _add_products4(r0, r1, r2, r3, left, right, i, sign, first=0):
    """r_q += sign * left[i + q, first:] @ right[first:] for q < 4: four rows against each sweep of
    right's rows, which loads them once for four rows; each row's sum in the order `_add_products`
    takes."""
    m, r = r0.shape[0], left.shape[1]
    k = first
    while k + 4 <= r:
        _add_4x4(r0, r1, r2, r3, right[k], right[k + 1], right[k + 2], right[k + 3], left, i, k, sign)
        k += 4
    while k < r:
        s0 = right[k]
        a0, b0, c0, d0 = sign * left[i, k], sign * left[i + 1, k], sign * left[i + 2, k], sign * left[i + 3, k]
        for j in range(m):
            v = s0[j]
            r0[j] += a0 * v
            r1[j] += b0 * v
            r2[j] += c0 * v
            r3[j] += d0 * v
        k += 1


@inline
def _start_4x4(o0, o1, o2, o3, b0, b1, b2, b3, v0, v1, v2, v3, coef, row, sign):
    """o_q = b_q + sum_p sign * coef[row + q, p] * v_p for q, p < 4 (b_q with no values: 0): what
    copying b_q into o_q, then `_add_4x4`, gives, in one sweep."""
    a0, a1 = sign * coef[row, 0], sign * coef[row, 1]
    a2, a3 = sign * coef[row, 2], sign * coef[row, 3]
    c0, c1 = sign * coef[row + 1, 0], sign * coef[row + 1, 1]
    c2, c3 = sign * coef[row + 1, 2], sign * coef[row + 1, 3]
    d0, d1 = sign * coef[row + 2, 0], sign * coef[row + 2, 1]
    d2, d3 = sign * coef[row + 2, 2], sign * coef[row + 2, 3]
    f0, f1 = sign * coef[row + 3, 0], sign * coef[row + 3, 1]
    f2, f3 = sign * coef[row + 3, 2], sign * coef[row + 3, 3]
    if b0.shape[0] > 0:
        for j in range(o0.shape[0]):
            w0, w1, w2, w3 = v0[j], v1[j], v2[j], v3[j]
            o0[j] = b0[j] + (a0 * w0 + a1 * w1 + a2 * w2 + a3 * w3)
            o1[j] = b1[j] + (c0 * w0 + c1 * w1 + c2 * w2 + c3 * w3)
            o2[j] = b2[j] + (d0 * w0 + d1 * w1 + d2 * w2 + d3 * w3)
            o3[j] = b3[j] + (f0 * w0 + f1 * w1 + f2 * w2 + f3 * w3)
    else:
        z = np.float32(0.0)
        for j in range(o0.shape[0]):
            w0, w1, w2, w3 = v0[j], v1[j], v2[j], v3[j]
            o0[j] = z + (a0 * w0 + a1 * w1 + a2 * w2 + a3 * w3)
            o1[j] = z + (c0 * w0 + c1 * w1 + c2 * w2 + c3 * w3)
            o2[j] = z + (d0 * w0 + d1 * w1 + d2 * w2 + d3 * w3)
            o3[j] = z + (f0 * w0 + f1 * w1 + f2 * w2 + f3 * w3)


@inline
def _set_products4(o0, o1, o2, o3, b0, b1, b2, b3, left, right, i, sign):
    """o_q = b_q + sign * left[i + q] @ right for q < 4 (b_q with no values: 0), the terms in the
    order `_add_products4` takes after copying b_q into o_q."""
    if left.shape[1] >= 4:
        _start_4x4(o0, o1, o2, o3, b0, b1, b2, b3, right[0], right[1], right[2], right[3], left, i, sign)
        return _add_products4(o0, o1, o2, o3, left, right, i, sign, 4)
    for o, b in ((o0, b0), (o1, b1), (o2, b2), (o3, b3)):
        for j in range(o.shape[0]):
            o[j] = b[j] if b.shape[0] > 0 else 0.0
    _add_products4(o0, o1, o2, o3, left, right, i, sign)


@jit
def residual_and_sum(x, e, sent_left, sent_right, sum_left, sum_right, lo, hi):
    """Rows lo..hi of x (n x m): e = x - sent_left @ sent_right (skipped when e has no rows), then
    x = sum_left @ sum_right. One pass over x and e where the library's GEMMs took three (copy, the
    in-place product, the reconstruction), each row's products summed in a fixed order: the same
    bits at any thread count and on any machine. Four rows at a time share the factor rows' loads
    (10-18% faster on the 125M shapes than one row at a time), and the copy of x into e (the zeros
    into x) goes with the first four products' sweep: r4 28.6 -> 23.0 ms, r8 36 -> 31 (125M shapes,
    2 threads). The same bits either way."""
    m = x.shape[1]
    keep = e.shape[0] > 0
    i = lo
    while i + 4 <= hi:
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        none = x0[:0]
        if keep:
            _set_products4(e[i], e[i + 1], e[i + 2], e[i + 3], x0, x1, x2, x3, sent_left, sent_right, i,
                           np.float32(-1.0))
        _set_products4(x0, x1, x2, x3, none, none, none, none, sum_left, sum_right, i, np.float32(1.0))
        i += 4
    for i in range(i, hi):
        xi = x[i]
        if keep:
            ei = e[i]
            for j in range(m):
                ei[j] = xi[j]
            _add_products(ei, sent_left, sent_right, i, np.float32(-1.0))
        for j in range(m):
            xi[j] = 0.0
        _add_products(xi, sum_left, sum_right, i, np.float32(1.0))


@intrinsic
def _prefetch(typingctx, a, i, j):
    """Ask the cache for a[i, j]'s line (read, kept close): a hint, never a fault, whatever i, j."""
    def codegen(context, builder, signature, args):
        ty = signature.args[0]
        ptr = cgutils.get_item_pointer(context, builder, ty, context.make_array(ty)(context, builder, args[0]),
                                       args[1:], wraparound=False)
        byte, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        call = builder.module.declare_intrinsic("llvm.prefetch", [byte],
                                                ir.FunctionType(ir.VoidType(), [byte, i32, i32, i32]))
        builder.call(call, [builder.bitcast(ptr, byte), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.void(a, i, j), codegen


LEFT_TILE = 128  # columns of x that `_add_left_rows` multiplies while the next rows' same columns load
LINE = 16  # float32 values in a 64-byte cache line


@inline
def _add_left_rows(s, x, out, lo, hi, fetch):
    """out += s[:, lo:hi] @ x[lo:hi], four rows of x against four output rows per sweep (the loads
    of x's rows shared: 1.5-1.9x over one output row per sweep from cache). `fetch` (x comes from
    memory): LEFT_TILE columns at a time, each tile's sweeps asking for the next four rows' tile
    first; the hardware's own prefetch left the loop waiting on memory (1.4-1.8x on the 125M
    shapes, 2 threads). The same bits either way: each output value takes its terms in one order."""
    m = x.shape[1]
    r = s.shape[0]
    i = lo
    tile = LEFT_TILE if fetch else m
    while i + 4 <= hi:
        for a in range(0, m, tile):
            b = min(m, a + tile)
            if fetch and i + 8 <= x.shape[0]:
                for q in range(i + 4, i + 8):
                    for j in range(a, b, LINE):
                        _prefetch(x, q, j)
            x0, x1, x2, x3 = x[i, a:b], x[i + 1, a:b], x[i + 2, a:b], x[i + 3, a:b]
            k = 0
            while k + 4 <= r:
                _add_4x4(out[k, a:b], out[k + 1, a:b], out[k + 2, a:b], out[k + 3, a:b], x0, x1, x2, x3, s, k, i,
                         np.float32(1.0))
                k += 4
            while k < r:
                a0, a1, a2, a3 = s[k, i], s[k, i + 1], s[k, i + 2], s[k, i + 3]
                o = out[k, a:b]
                for j in range(o.shape[0]):
                    o[j] += a0 * x0[j] + a1 * x1[j] + a2 * x2[j] + a3 * x3[j]
                k += 1
        i += 4
    while i < hi:
        xi = x[i]
        for k in range(r):
            a, o = s[k, i], out[k]
            for j in range(m):
                o[j] += a * xi[j]
        i += 1


ROWS_IN_CACHE = 64  # rows of x that `left_product` adds e into and multiplies while they are cached


@jit
def left_product(s, x, e, out, lo, hi):
    """out = s[:, lo:hi] @ x[lo:hi] (s r x n, x n x m), x read once, at about memory speed, where MKL
    ran this shape (r ~ 10 rows against a tall matrix) up to 3x slower, compute-bound. With e (n x m;
    no rows: none), x += e first, a block of rows at a time just before the block's product, so x
    comes from memory once (2x over adding first, on the 125M shapes). Blocks hold whole groups of
    four rows: the same bits as adding first."""
    out[:, :] = 0.0
    add = e.shape[0] > 0
    for a in range(lo, hi, ROWS_IN_CACHE):
        b = min(hi, a + ROWS_IN_CACHE)
        if add:
            for i in range(a, b):
                xi, ei = x[i], e[i]
                for j in range(x.shape[1]):
                    xi[j] += ei[j]
        _add_left_rows(s, x, out, a, b, not add)


@inline
def _column_dot(p, k, j):
    """sum_i p[i, k] p[i, j] in float64, as eight interleaved partial sums added in a fixed order
    (one running sum was bound by the additions' latency): the same bits on every machine."""
    n = p.shape[0]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    for a in range(0, n - n % 8, 8):
        s0 += np.float64(p[a, k]) * np.float64(p[a, j])
        s1 += np.float64(p[a + 1, k]) * np.float64(p[a + 1, j])
        s2 += np.float64(p[a + 2, k]) * np.float64(p[a + 2, j])
        s3 += np.float64(p[a + 3, k]) * np.float64(p[a + 3, j])
        s4 += np.float64(p[a + 4, k]) * np.float64(p[a + 4, j])
        s5 += np.float64(p[a + 5, k]) * np.float64(p[a + 5, j])
        s6 += np.float64(p[a + 6, k]) * np.float64(p[a + 6, j])
        s7 += np.float64(p[a + 7, k]) * np.float64(p[a + 7, j])
    for i in range(n - n % 8, n):
        s0 += np.float64(p[i, k]) * np.float64(p[i, j])
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@jit
def orthogonalize(p, eps, coefs):
    """Classical Gram-Schmidt on p's columns in place (p n x r; coefs: r float32 scratch), each
    projection applied twice (one pass loses orthogonality in fp32: errors of 1e-4 at full rank),
    then each column over (its norm + eps), eps keeping an all-zero column finite. Dot products and
    norms are float64 sums in a fixed order: the same bits on every machine, which every rank's P
    must be. One call a matrix where torch took ~30 small calls (6 ms of a powersgd step on the
    125M shapes)."""
    n, r = p.shape
    for j in range(r):
        for _ in range(2 if j else 0):
            for k in range(j):
                coefs[k] = _column_dot(p, k, j)
            for i in range(n):
                step = np.float32(0.0)
                for k in range(j):
                    step += p[i, k] * coefs[k]
                p[i, j] -= step
        scale = np.float32(np.sqrt(_column_dot(p, j, j)) + eps)
        for i in range(n):
            p[i, j] /= scale


# The dot products of `right_product` need their sums reassociated to run in vector lanes (strict
# order ran them one value at a time, 3-4x slower than MKL); the compiler's order is fixed for a
# machine: the same bits at any thread count there, though not across machines (nor are the BLAS's).
reassociating = dict(cache=True, _nrt=False, fastmath={"reassoc", "contract", "nsz"})


@njit(inline="always", **reassociating)
def _dots4x4(x0, x1, x2, x3, s0, s1, s2, s3):
    """The 16 dot products of four rows with four rows, each row loaded once for four products."""
    t00 = t01 = t02 = t03 = t10 = t11 = t12 = t13 = np.float32(0.0)
    t20 = t21 = t22 = t23 = t30 = t31 = t32 = t33 = np.float32(0.0)
    for j in range(x0.shape[0]):
        a, b, c, d = x0[j], x1[j], x2[j], x3[j]
        p, q, r, s = s0[j], s1[j], s2[j], s3[j]
        t00 += a * p
        t01 += a * q
        t02 += a * r
        t03 += a * s
        t10 += b * p
        t11 += b * q
        t12 += b * r
        t13 += b * s
        t20 += c * p
        t21 += c * q
        t22 += c * r
        t23 += c * s
        t30 += d * p
        t31 += d * q
        t32 += d * r
        t33 += d * s
    return (t00, t01, t02, t03, t10, t11, t12, t13, t20, t21, t22, t23, t30, t31, t32, t33)


@njit(inline="always", **reassociating)
def _dots4x1(x0, x1, x2, x3, s):
    t0 = t1 = t2 = t3 = np.float32(0.0)
    for j in range(x0.shape[0]):
        p = s[j]
        t0 += x0[j] * p
        t1 += x1[j] * p
        t2 += x2[j] * p
        t3 += x3[j] * p
    return t0, t1, t2, t3


@njit(nogil=True, **reassociating)
def right_product(x, e, st, out, lo, hi):
    """out[lo:hi] = x[lo:hi] @ st^T (x n x m, st r x m, both contiguous), four rows of x at a time
    against four of st's, x read once; with e (n x m; no rows: none), x += e first, four rows at a
    time just before their products. MKL ran this shape (X @ S, S ~ 10 columns) compute-bound: 2.1
    against 5.1 G values/s with the residual added, 2.6 against 7.4 without (768 x 3072, 10
    columns, 2 threads). Rows are grouped by four from row 0 (lo: a multiple of 4), so each row's
    bits do not depend on how the rows are split."""
    m, r = x.shape[1], st.shape[0]
    add = e.shape[0] > 0
    i = lo
    while i < hi:
        rows = 4 if i + 4 <= hi else 1
        if add:
            for q in range(i, i + rows):
                xq, eq = x[q], e[q]
                for j in range(m):
                    xq[j] += eq[j]
        if rows == 4:
            x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
            k = 0
            while k + 4 <= r:
                t = _dots4x4(x0, x1, x2, x3, st[k], st[k + 1], st[k + 2], st[k + 3])
                for q in range(4):
                    for p in range(4):
                        out[i + q, k + p] = t[4 * q + p]
                k += 4
            while k < r:
                t = _dots4x1(x0, x1, x2, x3, st[k])
                for q in range(4):
                    out[i + q, k] = t[q]
                k += 1
        else:
            xi = x[i]
            for k in range(r):
                total, sk = np.float32(0.0), st[k]
                for j in range(m):
                    total += xi[j] * sk[j]
                out[i, k] = total
        i += rows


# -- greedylore's bases ------------------------------------------------------------------------------
BASIS_BLOCK = 128  # rows of a basis whose products are summed together: the same blocks at any thread count


@jit
def position_weights(out):
    """Odd 64-bit weights, one per column, for `rotate_rows`'s checksum."""
    for j in range(out.shape[0]):
        out[j] = _mix(U(j)) | U(1)


@jit
def rotate_rows(basis, bits, tri, vt, bv, w, u, yt, parts, weights, first, lo, hi):
    """Rows lo..hi of a d x d basis (lo on a BASIS_BLOCK boundary), four at a time while they are in
    cache: basis -= (basis @ vt^T @ tri) @ vt (w = basis vt^T tri into `w`, through `bv`: d x t
    scratch; B V by `right_product`, so with its bits) and the first t columns set to u (t = u's
    columns; 0: not rotated), then
    parts[block] += yt[:, rows] @ basis[rows] (each block's part zeroed at its first row), and the
    rows' checksum, returned: the sum over rows i of (_mix(first + i) | 1) * sum_j bits[i, j] *
    weights[j], mod 2^64 (`bits`: basis viewed as uint32). The odd weights make any one changed
    value change the sum, which is the same however the rows are split; every product takes its
    terms in a fixed order: the same bits at any thread count."""
    t = u.shape[1]
    check = U(0)
    i = lo
    while i < hi:
        rows = 4 if i + 4 <= hi else 1
        part = parts[i // BASIS_BLOCK]
        if i % BASIS_BLOCK == 0:
            part[:, :] = 0.0
        if t > 0:
            right_product(basis, basis[:0], vt, bv, i, i + rows)
            for q in range(i, i + rows):
                for k in range(t):
                    total = np.float32(0.0)
                    for j in range(t):
                        total += bv[q, j] * tri[j, k]
                    w[q, k] = total
            if rows == 4:
                _add_products4(basis[i], basis[i + 1], basis[i + 2], basis[i + 3], w, vt, i, np.float32(-1.0))
            else:
                _add_products(basis[i], w, vt, i, np.float32(-1.0))
            for q in range(i, i + rows):
                for j in range(t):
                    basis[q, j] = u[q, j]
        _add_left_rows(yt, basis, part, i, i + rows, False)
        for q in range(i, i + rows):
            row, total = bits[q], U(0)
            for j in range(row.shape[0]):
                total += U(row[j]) * weights[j]
            check += total * (_mix(U(first + q)) | U(1))
        i += rows
    return check
