"""The quantizers' fused passes: levels, supports and bodies of each codec in single passes, and
the fixed-order norm they scale by."""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .common import BAD_CODE, PAST_END, TRUNCATED, U, inline, jit
from .fields import _end, _floor_log2, _push, _push_unary, _push_wide, _rstart, _start, _take, _take_run, read_rice


# -- the stochastic roundings' draws ----------------------------------------------------------------------

@intrinsic
def _mulhilo(typingctx, a, b):
    """(high, low) 64 bits of the 128-bit product a * b: LLVM's i128 multiply, one instruction on x86-64."""
    signature = types.UniTuple(types.uint64, 2)(types.uint64, types.uint64)

    def codegen(context, builder, sig, args):
        wide = ir.IntType(128)
        product = builder.mul(builder.zext(args[0], wide), builder.zext(args[1], wide))
        low = builder.trunc(product, ir.IntType(64))
        high = builder.trunc(builder.lshr(product, ir.Constant(wide, 64)), ir.IntType(64))
        return context.make_tuple(builder, sig.return_type, (high, low))
    return signature, codegen


_WORD = U(0xFFFFFFFF)


@inline
def _hashmix(value, multiplier):
    """SeedSequence's hashmix on 32-bit words (kept in 64 bits, masked): (hashed value, next multiplier)."""
    value ^= multiplier
    multiplier = (multiplier * U(0x931E8875)) & _WORD
    value = (value * multiplier) & _WORD
    return value ^ (value >> U(16)), multiplier


@inline
def _pool_mix(x, y):
    result = (U(0xCA01F9DD) * x - U(0x4973F715) * y) & _WORD
    return result ^ (result >> U(16))


@jit
def seed_sequence(entropy, pool, out):
    """numpy's SeedSequence(entropy).generate_state(out.size, np.uint64), the same words: the entropy
    (32-bit words, as numpy splits the ints it is given) mixed into a pool of four, then hashed out
    two 32-bit words to each uint64, low first. numpy runs it in Python objects, ~30 us a key, and
    a quantizer keys every tensor piece of every step. pool: room for 4 words."""
    multiplier = U(0x43B0D7E5)
    for i in range(4):
        pool[i], multiplier = _hashmix(entropy[i] if i < entropy.size else U(0), multiplier)
    for source in range(4):
        for target in range(4):
            if source != target:
                hashed, multiplier = _hashmix(pool[source], multiplier)
                pool[target] = _pool_mix(pool[target], hashed)
    for source in range(4, entropy.size):
        for target in range(4):
            hashed, multiplier = _hashmix(entropy[source], multiplier)
            pool[target] = _pool_mix(pool[target], hashed)
    multiplier = U(0x8B51F9DD)
    for i in range(2 * out.size):
        value = pool[i % 4] ^ multiplier
        multiplier = (multiplier * U(0x58F38DED)) & _WORD
        value = (value * multiplier) & _WORD
        value ^= value >> U(16)
        out[i // 2] = value if i % 2 == 0 else out[i // 2] | (value << U(32))


@jit
def philox_uniform(key0, key1, out):
    """numpy's Generator(Philox(seed)).random(out.size), the same doubles: Philox4x64-10 (Salmon et
    al., Random123) over the counters 1, 2, ..., keyed by the two words the seed's SeedSequence made,
    each uint64's top 53 bits scaled into [0, 1). numpy draws one value per call through its buffer;
    this is the same arithmetic in one loop, about twice as fast (`bench compress`'s encode rates)."""
    scale = 1.0 / 9007199254740992.0
    for block in range((out.size + 3) // 4):
        c0, c1, c2, c3 = U(block + 1), U(0), U(0), U(0)
        k0, k1 = key0, key1
        for r in range(10):
            if r:
                k0 += U(0x9E3779B97F4A7C15)
                k1 += U(0xBB67AE8584CAA73B)
            high0, low0 = _mulhilo(U(0xD2E7470EE14C6C93), c0)
            high1, low1 = _mulhilo(U(0xCA5A826395121157), c2)
            c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
        words = (c0, c1, c2, c3)
        for j in range(min(4, out.size - 4 * block)):
            out[4 * block + j] = (words[j] >> U(11)) * scale


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
def write_sparse_gamma(buf, pos, x, k, nonzero_at):
    """QSGD's body: gamma(gap + 1) per nonzero level, a sign bit per nonzero, gamma(level) per
    nonzero. It walks the nonzero positions (from `positions`): a pass over all d values, branching
    on each level, lost the branch predictor's coin flip five times over."""
    acc, n, out = _start(buf, pos)
    last = -1
    for i in nonzero_at:
        acc, n, out = _push_unary(buf, acc, n, out, _floor_log2(i - last))
        last = i
    last = -1
    for i in nonzero_at:
        width = _floor_log2(i - last)
        acc, n, out = _push_wide(buf, acc, n, out, (i - last) & ((np.int64(1) << width) - 1), width)
        last = i
    for i in nonzero_at:
        acc, n, out = _push(buf, acc, n, out, np.int64(x[i] < 0), 1)
    for i in nonzero_at:
        acc, n, out = _push_unary(buf, acc, n, out, _floor_log2(k[i]))
    for i in nonzero_at:
        width = _floor_log2(k[i])
        acc, n, out = _push_wide(buf, acc, n, out, k[i] & ((np.int64(1) << width) - 1), width)
    return _end(buf, acc, n, out)


@jit
def sparse_gamma_bits(k, nonzero_at):
    bits, last = 0, -1
    for i in nonzero_at:
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
    """total += values, each float32 value widened to float64 first: numpy's mixed-type add buffers
    its casts, torch's too."""
    for i in range(values.size):
        total[i] += np.float64(values[i])


@jit
def narrow(total, out):
    """out = total rounded to float32 (to nearest, as numpy's cast), without numpy's buffered cast."""
    for i in range(total.size):
        out[i] = np.float32(total[i])


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
