"""GreedyLore's bases: the reflectors a rotation is made of, and one pass that rotates a basis,
multiplies it by the sketch and checksums it."""
from __future__ import annotations

import numpy as np

from .common import U, _mix, jit
from .lowrank import _add_left_rows, _add_products, _add_products4, right_product


# -- greedylore's bases ------------------------------------------------------------------------------
BASIS_BLOCK = 128  # rows of a basis whose products are summed together: the same blocks at any thread count


@jit
def position_weights(out):
    """Odd 64-bit weights, one per column, for `rotate_rows`'s checksum."""
    for j in range(out.shape[0]):
        out[j] = _mix(U(j)) | U(1)


@jit
def reflectors(vt, tau, tri):
    """geqrf's Householder reflectors made explicit, and LAPACK larft's T for them. `vt` (t x d)
    holds geqrf's output transposed, row j the j-th reflector's tail after its diagonal; on return
    it is V^T with V unit lower triangular, and `tri` (t x t) the upper triangular T with
    I - V T V^T the product of the reflectors in order. Column j of T is
    -tau_j T[:j, :j] (V^T V)[:j, j], V^T V's column parked in T's while it is used."""
    t, d = vt.shape
    for j in range(t):
        for k in range(j):
            vt[j, k] = 0.0
        vt[j, j] = 1.0
    for j in range(t):
        for i in range(j):
            total = np.float32(0.0)
            for k in range(j, d):  # row j of V^T is zero before column j
                total += vt[i, k] * vt[j, k]
            tri[i, j] = total
        for i in range(j):  # rows in order: row i reads the Gram values of rows i.. only
            total = np.float32(0.0)
            for k in range(i, j):
                total += tri[i, k] * tri[k, j]
            tri[i, j] = -tau[j] * total
        for i in range(j + 1, t):
            tri[i, j] = 0.0
        tri[j, j] = tau[j]


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
