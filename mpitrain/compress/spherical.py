"""Blockwise Spherical Compression's codec and its counter-based generator of shared directions."""
from __future__ import annotations

import math

import numpy as np

from .base import kernels
from .bitcodec import PayloadError
from .codecs import Codec, check_finite, norm64, output_array, rice_parameter
from .streams import mix64


def cap_fraction(alpha: float, m: int) -> float:
    """P(alpha, m): the share of the unit sphere S^(m-1) within squared distance alpha of a point
    of radius sqrt(1 - alpha) (= 1/2 I_alpha((m-1)/2, 1/2)), by quadrature over the polar angle."""
    if m == 1:
        return 0.5
    theta_c = math.acos(math.sqrt(1 - alpha))
    grid = lambda a, b: np.linspace(a, b, 200_001)  # noqa: E731
    part = np.trapezoid(np.sin(grid(0, theta_c)) ** (m - 2), grid(0, theta_c))
    whole = np.trapezoid(np.sin(grid(0, math.pi)) ** (m - 2), grid(0, math.pi))
    return float(part / whole)


def block_bases(key: int, blocks) -> np.ndarray:
    """Each block's stream of the counter-based generator."""
    return mix64(mix64(np.array([key], dtype=np.uint64)) ^ np.asarray(blocks, dtype=np.uint64))


def candidates(key: int, blocks, ts, m: int) -> np.ndarray:
    """Unit vectors number t of blocks (rows; blocks and ts broadcast), each a pure function of
    (key, block, t): the decoder jumps straight to candidate T."""
    pairs = (m + 1) // 2
    ts = np.atleast_1d(np.asarray(ts, dtype=np.uint64))
    base = np.broadcast_to(block_bases(key, np.atleast_1d(blocks)), ts.shape)[:, None]
    with np.errstate(over="ignore"):
        counters = ts[:, None] * np.uint64(2 * pairs) + np.arange(2 * pairs, dtype=np.uint64)[None, :]
        u = (mix64(base ^ mix64(counters)) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    radius = np.sqrt(-2.0 * np.log1p(-u[:, 0::2]))  # Box-Muller: 1 - u is in (0, 1]
    z = np.concatenate([radius * np.cos(2 * np.pi * u[:, 1::2]), radius * np.sin(2 * np.pi * u[:, 1::2])], axis=1)
    z = z[:, :m]
    return z / np.linalg.norm(z, axis=1, keepdims=True)


class Spherical(Codec):
    """Blockwise Spherical Compression: for each block of m values, the first shared-seed random
    direction within sqrt(alpha) of it, scaled to sqrt(1 - alpha) of its norm; T goes in a
    Golomb-Rice code. ||C(x_b) - x_b||^2 <= alpha ||x_b||^2 on every draw. Expected cost
    ~1/P(alpha, m) candidates per block: practical only for small blocks and small models."""
    biased = True
    ZERO, CODED, RAW = 0, 1, 2
    SEARCH_BATCH = 4096

    def __init__(self, cfg):
        super().__init__(cfg)
        self.alpha, self.m = cfg.alpha, cfg.block
        self.scale = np.float32(math.sqrt(1 - self.alpha))
        self._params = {}

    def params(self, m: int):
        """(Rice parameter, cap on T) for blocks of m values: T passes its cap with probability e^-20."""
        if m not in self._params:
            p = cap_fraction(self.alpha, m)
            self._params[m] = (rice_parameter(1 / p), int(math.ceil(20 / p)))
        return self._params[m]

    def value(self, nrm: np.float32, z: np.ndarray) -> np.ndarray:
        return ((nrm * self.scale) * z.astype(np.float32)).astype(np.float32)

    def search(self, xb: np.ndarray, norms: np.ndarray, key: int, blocks: np.ndarray) -> np.ndarray:
        """For each block (rows of xb, all of one size, nonzero float32 norms): the smallest t whose
        candidate meets the bound in float arithmetic, or 0 past the cap. A compiled scan proposes
        the next t whose cosine clears the threshold less 1e-9 (its transcendental functions may
        differ from numpy's in the last bits); the test that decides runs here, in numpy."""
        x64 = xb.astype(np.float64)
        m = x64.shape[1]
        # row by row: the 1-D norms and sums of the definition, bit for bit
        units = x64 / np.array([[np.linalg.norm(row)] for row in x64])
        limits = self.alpha * np.array([np.sum(row ** 2) for row in x64])
        _, cap = self.params(m)
        threshold = math.sqrt(1 - self.alpha)
        bases = block_bases(key, blocks)
        found, starts = np.zeros(len(x64), dtype=np.int64), np.ones(len(x64), dtype=np.int64)
        pending = np.arange(len(x64))
        scratch = np.empty((2, (m + 1) // 2))
        while pending.size:
            proposed = np.empty(pending.size, dtype=np.int64)
            kernels().spherical_first(units[pending], bases[pending], starts[pending], cap, threshold * (1 - 1e-9),
                                      proposed, scratch[0], scratch[1])
            pending, proposed = pending[proposed > 0], proposed[proposed > 0]
            z = candidates(key, blocks[pending], proposed, m)
            sent = self.value(norms[pending, None], z).astype(np.float64)
            ok = np.einsum("ij,ij->i", z, units[pending]) >= threshold * (1 - 1e-12)
            ok &= np.array([np.sum(row ** 2) for row in sent - x64[pending]]) <= limits[pending]
            found[pending[ok]] = proposed[ok]
            starts[pending[~ok]] = proposed[~ok] + 1
            pending = pending[~ok]
        return found

    def encode(self, x, w, key, out=None):
        check_finite(x)
        starts = np.arange(0, x.size, self.m)
        sizes = np.minimum(self.m, x.size - starts)
        norms = np.array([norm64(x[s:s + self.m]) for s in starts], dtype=np.float32)
        ts = np.zeros(starts.size, dtype=np.int64)
        y = output_array(out, x.size, zeroed=False)
        y[...] = x  # raw blocks travel as they are
        for m in np.unique(sizes):  # a shorter last block, then the full ones: its own Rice parameter
            blocks = np.flatnonzero((sizes == m) & (norms > 0))
            if blocks.size:
                rows = np.stack([x[s:s + m] for s in starts[blocks]])
                ts[blocks] = self.search(rows, norms[blocks], key, blocks)
                coded = blocks[ts[blocks] > 0]
                sent = self.value(norms[coded, None], candidates(key, coded, ts[coded], m))
                y[(starts[coded, None] + np.arange(m)).ravel()] = sent.ravel()
        kinds = np.where(norms == 0, self.ZERO, np.where(ts > 0, self.CODED, self.RAW))
        y[np.repeat(kinds == self.ZERO, sizes)] = 0
        w.fixed(kinds, 2)
        w.fixed(norms[kinds == self.CODED].view(np.uint32), 32)
        for m in np.unique(sizes[kinds == self.CODED]):
            w.rice(ts[(kinds == self.CODED) & (sizes == m)] - 1, self.params(int(m))[0])
        w.fixed(x[np.repeat(kinds == self.RAW, sizes)].astype(np.float32).view(np.uint32), 32)
        return y

    def decode(self, r, d, key, out=None):
        starts = np.arange(0, d, self.m)
        sizes = np.minimum(self.m, d - starts)
        kinds = r.fixed(starts.size, 2)
        if (kinds > self.RAW).any():
            raise PayloadError("spherical block kind is invalid")
        coded = kinds == self.CODED
        norms = np.zeros(starts.size, dtype=np.float32)
        norms[coded] = r.fixed(int(coded.sum()), 32).astype(np.uint32).view(np.float32)
        ts = np.zeros(starts.size, dtype=np.int64)
        for m in np.unique(sizes[coded]):
            k, cap = self.params(int(m))
            ts[coded & (sizes == m)] = r.rice(int(np.sum(coded & (sizes == m))), k, cap=cap) + 1
        y = output_array(out, d, zeroed=True)
        raw = np.repeat(kinds == self.RAW, sizes)
        y[raw] = r.fixed(int(raw.sum()), 32).astype(np.uint32).view(np.float32)
        for m in np.unique(sizes[coded]):
            blocks = np.flatnonzero(coded & (sizes == m))
            sent = self.value(norms[blocks, None], candidates(key, blocks, ts[blocks], int(m)))
            y[(starts[blocks, None] + np.arange(m)).ravel()] = sent.ravel()
        return y
