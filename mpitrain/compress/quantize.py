"""Quantizers and sparsifiers: Sparse Dithering, Spherical Compression, QSGD, natural compression,
top-k (payloads that cannot be summed: Allgatherv, then decode-sum) and rand-k (summable).

Every tensor is compressed on its own (its own norm). A codec writes a real bitstream and returns
exactly what the receiver will decode, so decode(encode(x)) == C(x) bit for bit, and error
feedback keeps e = p - C(p) with the very values that travelled.

A rank's payload: one version byte, its three control words (fp32), then per tensor a uint32
byte length and the tensor's bitstream, then a CRC32 of all of it. Per tensor of d values:
  sparse-dither  31 (scale) + ceil(log2(d+1)) (zero count) + 1 flag + Rice-coded gaps between the
                 nonzeros or between the zeros (whichever is shorter, as the flag says)
                 + 1 sign bit per nonzero + unary levels (k bits for level k)
  qsgd           32 (norm) + gamma(nnz+1) + per nonzero: gamma(gap+1), 1 sign bit, gamma(level)
  natural        9 bits per value: sign and an 8-bit power-of-two exponent (code 0 is zero)
  topk           k * (32 + ceil(log2 d)): indices and fp32 values
  spherical      per block of m: 2 bits (zero, coded, raw); coded: fp32 norm + Rice(T - 1);
                 raw (T past its cap): m fp32 values
"""
from __future__ import annotations

import math
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..layout import all_finite
from .base import Buckets, Compressor, kernels, register
from .bitcodec import BitReader, BitWriter, PayloadError, gamma_bits
from .streams import Purpose, numpy_stream, rounding_key
PAYLOAD_VERSION = 1


def _check_finite(x: np.ndarray):
    if not np.isfinite(x).all():
        raise ValueError("cannot compress a vector holding NaN or Inf")


def _norm(x: np.ndarray) -> float:
    """The Euclidean norm in float64: no overflow or underflow for any float32 input."""
    return float(kernels().norm(x))


def _draws(key: int, d: int, out: np.ndarray | None = None) -> np.ndarray:
    """The uniform draws of a stochastic rounding: Philox, keyed by (seed, rank, step, tensor)."""
    return np.random.Generator(np.random.Philox(key)).random(d, out=out)


_NO_DRAWS = np.zeros(0)


def _float_bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def _width(n: int) -> int:
    """Bits to write any integer in [0, n]."""
    return int(n).bit_length()


def rice_parameter(mean: float) -> int:
    """Golomb-Rice parameter for a geometric source with this mean."""
    return max(0, int(round(math.log2(mean * math.log(2))))) if mean > 0 else 0


class Codec:
    biased = False

    def __init__(self, cfg):
        self.cfg = cfg
        self._kept: dict[str, np.ndarray] = {}

    def encode(self, x: np.ndarray, w: BitWriter, key: int, out: np.ndarray | None = None) -> np.ndarray:
        """Write x's code; return exactly what decode will produce (float32), in `out` if given."""
        raise NotImplementedError

    def decode(self, r: BitReader, d: int, key: int, out: np.ndarray | None = None) -> np.ndarray:
        """The d values x's code stands for (float32), in `out` if given."""
        raise NotImplementedError

    def kept(self, purpose: str, n: int, dtype) -> np.ndarray:
        """n values of a work buffer kept between calls for `purpose` (grown to the largest tensor,
        then reused): fresh ones per tensor per step had their pages faulted in anew each time
        (`bench compress` measures the step)."""
        have = self._kept.get(purpose)
        if have is None or have.size < n or have.dtype != dtype:
            self._kept[purpose] = have = np.empty(n, dtype=dtype)
        return have[:n]


def _output(out: np.ndarray | None, d: int, zeroed: bool) -> np.ndarray:
    if out is None:
        return np.zeros(d, dtype=np.float32) if zeroed else np.empty(d, dtype=np.float32)
    if zeroed:
        out.fill(0.0)
    return out


class SparseDither(Codec):
    """u = x/||x|| on the grid {0, 2h, 4h, ...}, h = sqrt(nu/d); C(x) = gamma * sign * k with
    gamma = 2h||x||. det: nearest level, ||C(x)-x||^2 <= nu ||x||^2 always. rand: stochastic
    rounding, unbiased with variance <= nu ||x||^2."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.nu, self.randomized = cfg.nu, cfg.dither == "rand"
        self.biased = not self.randomized

    @staticmethod
    def values(gamma: np.float32, k: np.ndarray, negative: np.ndarray) -> np.ndarray:
        mag = gamma * k.astype(np.float32)
        return np.where(negative, -mag, mag).astype(np.float32)

    def levels(self, x: np.ndarray, key: int, k: np.ndarray | None = None):
        """(gamma as float32, integer levels k) of x: r = |x| / (||x|| step) rounded to the nearest
        integer (det) or stochastically (rand). k: where to put the levels, if given."""
        d, nrm = x.size, _norm(x)
        step = 2 * math.sqrt(self.nu / d)
        k = np.empty(d, dtype=np.int64) if k is None else k
        if nrm == 0:
            k.fill(0)
            return np.float32(0), k
        u = _draws(key, d, self.kept("draws", d, np.float64)) if self.randomized else _NO_DRAWS
        kernels().stochastic_levels(x, 1.0, nrm * step, u, np.iinfo(np.int64).max, k)
        return np.float32(step * nrm), k

    @staticmethod
    def support(k: np.ndarray, at: np.ndarray | None = None):
        """(zeros marked, their positions, Rice parameter, bits, nonzero positions, sum of levels): the
        support as gaps before each nonzero or before each zero, whichever codes shorter. Rice codes
        are near-optimal only for long gaps, so the rarer class is usually the one to code. at: room
        for both lists (2 (d + 1) int64), if given."""
        d = k.size
        at = np.empty(2 * (d + 1), dtype=np.int64) if at is None else at
        nonzero_at, zero_at = at[:d + 1], at[d + 1:]
        nnz, total = kernels().positions(k, nonzero_at, zero_at)
        nonzero_at, zero_at = nonzero_at[:nnz], zero_at[:d - nnz]
        options = [(marked, rice_parameter((d - marked.size) / max(marked.size, 1))) for marked in (nonzero_at, zero_at)]
        bits = [kernels().rice_gap_bits(marked, param) for marked, param in options]
        zeros_marked = bits[1] < bits[0]
        marked, param = options[zeros_marked]
        return zeros_marked, marked, param, bits[zeros_marked], nonzero_at, total

    def encode(self, x, w, key, out=None):
        _check_finite(x)
        d = x.size
        gamma, k = self.levels(x, key, self.kept("levels", d, np.int64))
        zeros_marked, marked, param, support_bits, nonzero_at, total = self.support(
            k, self.kept("positions", 2 * (d + 1), np.int64))
        w.fixed(int(np.array(gamma).view(np.uint32)) & 0x7FFFFFFF, 31)
        w.fixed(d - nonzero_at.size, _width(d))
        w.fixed(int(zeros_marked), 1)
        w.body(kernels().write_levels, support_bits + nonzero_at.size + total, x, k, marked, param, nonzero_at)
        y = _output(out, d, zeroed=False)
        kernels().scaled_signed(gamma, k, x, y)
        return y

    def decode(self, r, d, key, out=None):
        gamma = np.array(r.fixed(1, 31)[0], dtype=np.uint32).view(np.float32)
        n0 = int(r.fixed(1, _width(d))[0])
        if n0 > d or (gamma == 0 and n0 != d):
            raise PayloadError("sparse-dither header is inconsistent")
        zeros_marked = bool(r.fixed(1, 1)[0])
        count = n0 if zeros_marked else d - n0
        y = _output(out, d, zeroed=True)
        r.body(kernels().read_levels, zeros_marked, rice_parameter((d - count) / max(count, 1)),
               int(math.ceil(0.5 / math.sqrt(self.nu / d))), gamma, self.kept("marked", count, np.int64),
               self.kept("flags", d if zeros_marked else 0, np.bool_), self.kept("index", d - n0 + 1, np.int64), y)
        return y

    def bits(self, x: np.ndarray, key: int = 0) -> int:
        """The closed form: 31 + ceil(log2(d+1)) + 1 + Rice(gaps) + nnz + sum(k)."""
        _, k = self.levels(x, key)
        _, _, _, support_bits, nonzero_at, total = self.support(k)
        return 31 + _width(x.size) + 1 + support_bits + nonzero_at.size + total


class QSGD(Codec):
    """Stochastic rounding of |x_i|/||x|| to s levels (unbiased), Elias-coded (Alistarh et al.)."""

    def levels(self, x, key, k=None):
        s, nrm = self.cfg.levels, np.float32(_norm(x))
        k = np.empty(x.size, dtype=np.int64) if k is None else k
        if nrm != 0:
            kernels().stochastic_levels(x, float(s), float(nrm), _draws(key, x.size, self.kept("draws", x.size, np.float64)),
                                        s, k)
        else:
            k.fill(0)
        return nrm, k

    def values(self, nrm, k, negative):
        mag = (nrm / np.float32(self.cfg.levels)) * k.astype(np.float32)
        return np.where(negative, -mag, mag).astype(np.float32)

    def encode(self, x, w, key, out=None):
        _check_finite(x)
        nrm, k = self.levels(x, key, self.kept("levels", x.size, np.int64))
        w.fixed(int(np.array(nrm).view(np.uint32)), 32)
        w.gamma([np.count_nonzero(k) + 1])
        w.body(kernels().write_sparse_gamma, kernels().sparse_gamma_bits(k), x, k)
        y = _output(out, x.size, zeroed=False)
        kernels().scaled_signed(nrm / np.float32(self.cfg.levels), k, x, y)
        return y

    def decode(self, r, d, key, out=None):
        nrm = np.array(r.fixed(1, 32)[0], dtype=np.uint32).view(np.float32)
        nnz = int(r.gamma(1)[0]) - 1
        if not 0 <= nnz <= d:
            raise PayloadError("qsgd header is inconsistent")
        nz = np.cumsum(r.gamma(nnz)) - 1
        if nnz and nz[-1] >= d:
            raise PayloadError("qsgd support runs past the end of the tensor")
        negative = r.fixed(nnz, 1).astype(bool)
        k = r.gamma(nnz)
        if (k > self.cfg.levels).any():
            raise PayloadError("qsgd level above --levels")
        y = _output(out, d, zeroed=True)
        y[nz] = self.values(nrm, k, negative)
        return y

    def bits(self, x, key=0) -> int:
        _, k = self.levels(x, key)
        nz = np.flatnonzero(k)
        return 32 + int(gamma_bits([nz.size + 1]).sum() + gamma_bits(np.diff(nz, prepend=-1)).sum()) \
            + nz.size + int(gamma_bits(k[nz]).sum())


class Natural(Codec):
    """Unbiased random rounding of each value to a neighbouring power of two: sign + 8-bit
    exponent code. Codes 1..254 are 2^(c-127) over the whole float32 range (no clamping);
    below 2^-126 a value rounds to 2^-126 or to 0 (code 0), still unbiased."""

    def codes(self, x, key, codes=None):
        """From the float32 bits: |x| = 2^(E-127) (1 + m/2^23) rounds up to the next power of two
        with probability m/2^23, so code = E + [u < m/2^23]; subnormals (E = 0) round to 2^-126
        (code 1) with probability |x|/2^-126 = m/2^23 too. u * 2^23 < m is that comparison exactly."""
        codes = np.empty(x.size, dtype=np.int64) if codes is None else codes
        if kernels().natural_codes(_float_bits(x), _draws(key, x.size, self.kept("draws", x.size, np.float64)),
                                   codes) < 0:
            raise ValueError("natural compression cannot round |x| >= 2^127 up (2^128 is not a float32)")
        return codes

    @staticmethod
    def values(code, negative):
        """sign * 2^(code-127), and 0 for code 0, built as float32 bits (negative zero keeps its sign)."""
        bits = (np.asarray(code, dtype=np.uint32) << 23) | (np.asarray(negative, dtype=np.uint32) << 31)
        return bits.view(np.float32)

    def encode(self, x, w, key, out=None):
        _check_finite(x)
        code = self.codes(x, key, self.kept("codes", x.size, np.int64))
        w.body(kernels().write_natural, 9 * x.size, _float_bits(x), code)
        y = _output(out, x.size, zeroed=False)
        y[...] = self.values(code, np.signbit(x))
        return y

    def decode(self, r, d, key, out=None):
        y = _output(out, d, zeroed=False)
        r.body(kernels().read_natural, y.view(np.uint32))
        return y

    def bits(self, x, key=0) -> int:
        return 9 * x.size


def top_k_indices(a: np.ndarray, k: int) -> np.ndarray:
    """Increasing indices of the k largest values of a, ties to the lower index: what a stable
    descending sort would pick, found in linear time (a partition for the k-th value, then the
    values above it and the lowest-indexed of those equal to it)."""
    if k >= a.size:
        return np.arange(a.size)
    kth = np.partition(a, a.size - k)[a.size - k]
    above = np.flatnonzero(a > kth)
    level = np.flatnonzero(a == kth)[: k - above.size]
    return np.union1d(above, level)


class TopK(Codec):
    """The k = ceil(ratio * d) largest magnitudes (ties to the lower index), sent exactly."""
    biased = True

    def k(self, d):
        return min(d, max(1, math.ceil(self.cfg.ratio * d)))

    def encode(self, x, w, key, out=None):
        _check_finite(x)
        idx = top_k_indices(np.abs(x), self.k(x.size))
        w.fixed(idx, _width(x.size - 1))
        w.fixed(x[idx].view(np.uint32).astype(np.int64), 32)
        y = _output(out, x.size, zeroed=True)
        y[idx] = x[idx]
        return y

    def decode(self, r, d, key, out=None):
        k = self.k(d)
        idx = r.fixed(k, _width(d - 1))
        if (np.diff(idx) <= 0).any() or (idx >= d).any():
            raise PayloadError("topk indices are not increasing within the tensor")
        y = _output(out, d, zeroed=True)
        y[idx] = r.fixed(k, 32).astype(np.uint32).view(np.float32)
        return y

    def bits(self, x, key=0) -> int:
        return self.k(x.size) * (32 + _width(x.size - 1))


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


_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a counter-based generator is this applied to (key, block, t, j)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def block_bases(key: int, blocks) -> np.ndarray:
    """Each block's stream of the counter-based generator."""
    return _mix(_mix(np.array([key], dtype=np.uint64)) ^ np.asarray(blocks, dtype=np.uint64))


def candidates(key: int, blocks, ts, m: int) -> np.ndarray:
    """Unit vectors number t of blocks (rows; blocks and ts broadcast), each a pure function of
    (key, block, t): the decoder jumps straight to candidate T."""
    pairs = (m + 1) // 2
    ts = np.atleast_1d(np.asarray(ts, dtype=np.uint64))
    base = np.broadcast_to(block_bases(key, np.atleast_1d(blocks)), ts.shape)[:, None]
    with np.errstate(over="ignore"):
        counters = ts[:, None] * np.uint64(2 * pairs) + np.arange(2 * pairs, dtype=np.uint64)[None, :]
        u = (_mix(base ^ _mix(counters)) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
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
        _check_finite(x)
        starts = np.arange(0, x.size, self.m)
        sizes = np.minimum(self.m, x.size - starts)
        norms = np.array([_norm(x[s:s + self.m]) for s in starts], dtype=np.float32)
        ts = np.zeros(starts.size, dtype=np.int64)
        y = _output(out, x.size, zeroed=False)
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
        y = _output(out, d, zeroed=True)
        raw = np.repeat(kinds == self.RAW, sizes)
        y[raw] = r.fixed(int(raw.sum()), 32).astype(np.uint32).view(np.float32)
        for m in np.unique(sizes[coded]):
            blocks = np.flatnonzero(coded & (sizes == m))
            sent = self.value(norms[blocks, None], candidates(key, blocks, ts[blocks], int(m)))
            y[(starts[blocks, None] + np.arange(m)).ravel()] = sent.ravel()
        return y


CODECS = {"sparse-dither": SparseDither, "qsgd": QSGD, "natural": Natural, "topk": TopK, "spherical": Spherical}


class Exchanged(Compressor):
    """Compress every tensor with a codec, Allgatherv the byte payloads, decode every rank's and sum.

    With error feedback each rank keeps e = p - C(p), p = g + e, where C(p) is exactly what its
    payload decodes to: sum over steps of what was sent = sum of gradients - the last residual.

    With --bucket-mb and a core to spare (--overlap-encoding), each bucket's tensors are encoded on a worker
    thread as backward finishes them (the compiled codecs run without the interpreter lock); the
    payload is framed and exchanged after backward, byte for byte the one a step without overlap
    sends. New residuals go to a second buffer until the step's gradients are known to be finite.
    """

    linear = False
    reshardable = False

    def __init__(self, layout, world, cfg):
        self.codec = CODECS[self.name](cfg)
        self.biased = self.codec.biased
        super().__init__(layout, world, cfg)
        self.grads = layout.flat_np[: layout.numel]
        self.residual = np.zeros(layout.numel, dtype=np.float32) if self.error_feedback else None
        # where torch's threads already fill the rank's cores, a worker only slows backward (measured)
        spare = cfg.overlap_encoding == "on" or (cfg.overlap_encoding == "auto"
                                                 and world.cores_per_rank() > torch.get_num_threads())
        self.buckets = Buckets(layout, world, int(cfg.bucket_mb * 2**20) if spare else 0, self.start_bucket)
        self.next_step, self.worker, self.jobs = None, None, []
        self.segments: dict = {}   # slot index -> (bitstream, bits), this step's
        self.spare = None          # the residuals being written, swapped in once the step is finite
        self.total = None          # the ranks' shares summed in float64, in rank order

    @property
    def overlaps(self) -> bool:
        return len(self.buckets) > 0

    def begin(self):
        if self.next_step is not None:
            self.buckets.begin(self.next_step)

    def start_bucket(self, bucket) -> list:
        if self.worker is None:
            self.worker = ThreadPoolExecutor(1, thread_name_prefix="mpitrain-encode")
            self.spare = None if self.residual is None else np.zeros_like(self.residual)
        self.jobs.append(self.worker.submit(self.encode_finite, bucket[2], self.buckets.step))
        return []

    def encode_finite(self, slots, step: int) -> bool:
        """Encode these tensors unless one is not finite (then the step is encoded again from zero)."""
        lo, hi = min(s.offset for s in slots), max(s.offset + s.numel for s in slots)
        if self.residual is not None:
            self.grads[lo:hi] += self.residual[lo:hi]
        if not all_finite(torch.from_numpy(self.grads[lo:hi])):
            return False
        for slot in slots:
            self.encode_slot(slot, step, self.spare)
        return True

    def key(self, rank: int, step: int, slot) -> int:
        return rounding_key(self.cfg.seed, rank, step, slot.index)

    def encode_slot(self, slot, step: int, residual) -> None:
        """One tensor of p into `segments`, and p - C(p) into `residual` (if kept)."""
        p = self.grads[slot.offset:slot.offset + slot.numel]
        w = BitWriter()
        sent = self.codec.kept("sent", slot.numel, np.float32) if residual is None else \
            residual[slot.offset:slot.offset + slot.numel]  # C(p) first, then p - C(p) in its place
        self.codec.encode(p, w, self.key(self.world.rank, step, slot), out=sent)
        if residual is not None:
            np.subtract(p, sent, out=sent)
        self.segments[slot.index] = (w.bytes(), w.nbits)

    def frame(self) -> np.ndarray:
        """This rank's payload: version, control words, each tensor's length and bitstream, CRC."""
        parts = [np.array([PAYLOAD_VERSION], dtype=np.uint8), self.layout.control.words.numpy().view(np.uint8)]
        for slot in self.layout.slots:
            segment = self.segments[slot.index][0]
            parts += [np.array([segment.size], dtype="<u4").view(np.uint8), segment]
        body = np.concatenate(parts)
        crc = np.array([zlib.crc32(body.tobytes())], dtype="<u4").view(np.uint8)
        self.segment_bits = [self.segments[slot.index][1] for slot in self.layout.slots]  # for tests, diagnostics
        bits = sum(self.segment_bits)
        self.stats = {"payload_bits": bits, "bits_per_value": bits / self.grads.size}
        return np.concatenate([body, crc])

    def decode(self, payload: np.ndarray, rank: int, step: int, total: np.ndarray) -> np.ndarray:
        """Add one rank's gradient share into `total` (float64) and return its control words;
        PayloadError if the payload is not exact."""
        where = f"payload from rank {rank}"
        if payload.size < 1 + 12 + 4 or zlib.crc32(payload[:-4].tobytes()) != int(payload[-4:].view("<u4")[0]):
            raise PayloadError(f"{where}: checksum mismatch (truncated, extended or corrupted)")
        if payload[0] != PAYLOAD_VERSION:
            raise PayloadError(f"{where}: unknown payload version {payload[0]}")
        control = payload[1:13].view(np.float32)
        at = 13
        for slot in self.layout.slots:
            if at + 4 > payload.size - 4:
                raise PayloadError(f"{where}: truncated")
            n = int(payload[at:at + 4].view("<u4")[0])
            segment = payload[at + 4:at + 4 + n]
            if segment.size != n:
                raise PayloadError(f"{where}: truncated")
            reader = BitReader(segment)
            try:
                values = self.codec.decode(reader, slot.numel, self.key(rank, step, slot),
                                           out=self.codec.kept("decoded", slot.numel, np.float32))
                reader.finish()
            except PayloadError as e:
                raise PayloadError(f"{where}, tensor {slot.name}: {e}") from None
            kernels().accumulate(total[slot.offset:slot.offset + slot.numel], values)
            at += 4 + n
        if at != payload.size - 4:
            raise PayloadError(f"{where}: extended past its last tensor")
        return control

    def encoded_in_backward(self, step: int) -> bool:
        """Wait for backward's encodings and finish this rank's share; False (nothing kept) when a
        gradient was not finite, as the exchange after backward would have found: then the share
        is zero, the non-finite flag raised, and the step is encoded again from the residual alone."""
        self.buckets.finish(step=step)
        finite = all([job.result() for job in self.jobs])  # every job waited for (and its error raised)
        self.jobs = []
        if finite and not self.layout.control.nonfinite:  # the caller checked the tail
            tail = self.layout.dense_offset  # the tensors in no bucket, after the matrices
            if self.residual is not None:
                self.grads[tail:] += self.residual[tail:]
            for slot in self.layout.dense:
                self.encode_slot(slot, step, self.spare)
            if self.residual is not None:
                self.residual, self.spare = self.spare, self.residual
            return True
        self.grads[...] = 0.0
        self.layout.control.drop_share()
        return False

    def aggregate(self, step: int) -> None:
        self.next_step = step + 1
        overlapped = self.buckets.in_flight and self.encoded_in_backward(step)
        if not overlapped:
            if self.residual is not None:
                self.grads += self.residual
            for slot in self.layout.slots:
                self.encode_slot(slot, step, self.residual)
        payload = self.frame()
        self.stats["encoded_in_backward"] = len(self.layout.matrices) if overlapped else 0
        if self.total is None:  # kept: a fresh gradient-sized float64 array cost 0.26 s a step on 125M values
            self.total = np.zeros(self.grads.size, dtype=np.float64)
        self.total.fill(0.0)
        control = np.zeros(3, dtype=np.float64)
        for rank, part in enumerate(self.world.allgatherv(payload)):  # same order on every rank
            control += self.decode(part, rank, step, self.total)
        kernels().narrow(self.total, self.grads)
        self.layout.control.words.copy_(torch.from_numpy(np.asarray(control, dtype=np.float32)))

    def state_dict(self, copy: bool = True) -> dict:
        residual = self.residual if self.residual is None or not copy else self.residual.copy()
        return {"local": {"residual": residual} if residual is not None else {}, "shared": {}}

    def load_state_dict(self, state: dict) -> None:
        if self.residual is not None:
            residual = state["local"].get("residual")
            self.residual[...] = 0.0 if residual is None else residual


for _name in CODECS:  # one registered compressor per codec, e.g. --compressor sparse-dither
    register(type(f"Exchanged_{_name.replace('-', '_')}", (Exchanged,), {"name": _name}))


@register
class RandK(Compressor):
    """k = ceil(ratio * d) coordinates per tensor, the same on every rank (shared seed by step and
    tensor), scaled by d/k: unbiased, and summable, so one Allreduce carries every tensor's k values."""

    name = "randk"
    biased = False

    def __init__(self, layout, world, cfg):
        super().__init__(layout, world, cfg)
        self.k = [min(s.numel, max(1, math.ceil(cfg.ratio * s.numel))) for s in layout.slots]
        self.buffer = np.zeros(sum(self.k) + layout.control.words.numel(), dtype=np.float32)
        self.grads = layout.flat_np[: layout.numel]
        self.residual = np.zeros(layout.numel, dtype=np.float32) if self.error_feedback else None

    def indices(self, step: int) -> list[np.ndarray]:
        return [np.sort(numpy_stream(self.cfg.seed, step, s.index, Purpose.RANDK).choice(s.numel, k, replace=False))
                for s, k in zip(self.layout.slots, self.k)]

    def aggregate(self, step: int) -> None:
        chosen, at = self.indices(step), 0
        if self.residual is not None:
            self.grads += self.residual
            self.residual[...] = self.grads
        for s, idx in zip(self.layout.slots, chosen):
            self.buffer[at:at + idx.size] = self.grads[s.offset + idx] * (s.numel / idx.size)
            if self.residual is not None:  # e = p - C(p), with C(p) this rank's own scaled values
                self.residual[s.offset + idx] -= self.buffer[at:at + idx.size]
            at += idx.size
        self.buffer[at:] = self.layout.control.words.numpy()
        self.world.allreduce_(self.buffer)
        self.grads[...] = 0.0
        at = 0
        for s, idx in zip(self.layout.slots, chosen):
            self.grads[s.offset + idx] = self.buffer[at:at + idx.size]
            at += idx.size
        self.layout.control.words.copy_(torch.from_numpy(self.buffer[at:]))

    state_dict = Exchanged.state_dict
    load_state_dict = Exchanged.load_state_dict
