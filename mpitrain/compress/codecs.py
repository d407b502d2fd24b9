"""The quantizers' and sparsifiers' codecs: Sparse Dithering, QSGD, natural compression, top-k
(and Spherical Compression, in `spherical`). Pure functions of a tensor, a bit writer and a key:
no ranks, no exchange (that is `quantize`'s).

Every tensor is compressed on its own (its own norm). A codec writes a real bitstream and returns
exactly what the receiver will decode, so decode(encode(x)) == C(x) bit for bit, and error
feedback keeps e = p - C(p) with the very values that travelled. Per tensor of d values:
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

import numpy as np

from .base import kernels
from .bitcodec import BitReader, BitWriter, PayloadError, gamma_bits
from .streams import seed_state


def check_finite(x: np.ndarray):
    if not np.isfinite(x).all():
        raise ValueError("cannot compress a vector holding NaN or Inf")


def norm64(x: np.ndarray) -> float:
    """The Euclidean norm in float64: no overflow or underflow for any float32 input."""
    return float(kernels().norm(x))


def _draws(key: int, d: int, out: np.ndarray | None = None) -> np.ndarray:
    """The uniform draws of a stochastic rounding: numpy's Philox keyed by (seed, rank, step, tensor),
    its doubles computed in a compiled loop."""
    out = np.empty(d) if out is None else out
    key0, key1 = seed_state(key, words=2)  # the key numpy's Philox(key) makes of it
    kernels().philox_uniform(key0, key1, out[:d])
    return out[:d]


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


def output_array(out: np.ndarray | None, d: int, zeroed: bool) -> np.ndarray:
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
        d, nrm = x.size, norm64(x)
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
        check_finite(x)
        d = x.size
        gamma, k = self.levels(x, key, self.kept("levels", d, np.int64))
        zeros_marked, marked, param, support_bits, nonzero_at, total = self.support(
            k, self.kept("positions", 2 * (d + 1), np.int64))
        w.fixed(int(np.array(gamma).view(np.uint32)) & 0x7FFFFFFF, 31)
        w.fixed(d - nonzero_at.size, _width(d))
        w.fixed(int(zeros_marked), 1)
        w.body(kernels().write_levels, support_bits + nonzero_at.size + total, x, k, marked, param, nonzero_at)
        y = output_array(out, d, zeroed=False)
        kernels().scaled_signed(gamma, k, x, y)
        return y

    def decode(self, r, d, key, out=None):
        gamma = np.array(r.fixed(1, 31)[0], dtype=np.uint32).view(np.float32)
        n0 = int(r.fixed(1, _width(d))[0])
        if n0 > d or (gamma == 0 and n0 != d):
            raise PayloadError("sparse-dither header is inconsistent")
        zeros_marked = bool(r.fixed(1, 1)[0])
        count = n0 if zeros_marked else d - n0
        y = output_array(out, d, zeroed=True)
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
        s, nrm = self.cfg.levels, np.float32(norm64(x))
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
        check_finite(x)
        nrm, k = self.levels(x, key, self.kept("levels", x.size, np.int64))
        at = self.kept("positions", 2 * (x.size + 1), np.int64)
        nnz, _ = kernels().positions(k, at[:x.size + 1], at[x.size + 1:])
        nonzero_at = at[:nnz]
        w.fixed(int(np.array(nrm).view(np.uint32)), 32)
        w.gamma([nnz + 1])
        w.body(kernels().write_sparse_gamma, kernels().sparse_gamma_bits(k, nonzero_at), x, k, nonzero_at)
        y = output_array(out, x.size, zeroed=False)
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
        y = output_array(out, d, zeroed=True)
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
        check_finite(x)
        code = self.codes(x, key, self.kept("codes", x.size, np.int64))
        w.body(kernels().write_natural, 9 * x.size, _float_bits(x), code)
        y = output_array(out, x.size, zeroed=False)
        y[...] = self.values(code, np.signbit(x))
        return y

    def decode(self, r, d, key, out=None):
        y = output_array(out, d, zeroed=False)
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
        check_finite(x)
        idx = top_k_indices(np.abs(x), self.k(x.size))
        w.fixed(idx, _width(x.size - 1))
        w.fixed(x[idx].view(np.uint32).astype(np.int64), 32)
        y = output_array(out, x.size, zeroed=True)
        y[idx] = x[idx]
        return y

    def decode(self, r, d, key, out=None):
        k = self.k(d)
        idx = r.fixed(k, _width(d - 1))
        if (np.diff(idx) <= 0).any() or (idx >= d).any():
            raise PayloadError("topk indices are not increasing within the tensor")
        y = output_array(out, d, zeroed=True)
        y[idx] = r.fixed(k, 32).astype(np.uint32).view(np.float32)
        return y

    def bits(self, x, key=0) -> int:
        return self.k(x.size) * (32 + _width(x.size - 1))
