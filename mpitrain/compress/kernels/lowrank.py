"""The low-rank compressors' skinny products, residual-and-reconstruction pass and Gram-Schmidt.
One exception to fixed-order arithmetic: `right_product`'s dot products (see `reassociating`)."""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .common import inline, jit


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
    bits at any thread count and on any machine. Four rows at a time share the factor rows' loads,
    and the copy of x into e (the zeros into x) goes with the first four products' sweep, so x and e
    cross memory once (`bench compress` measures the step). The same bits either way."""
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
    must be. One call a matrix where torch took ~30 small calls."""
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
