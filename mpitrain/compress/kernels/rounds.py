"""Greedylore's 16-bit rounds: values on shared per-line scales (a line: a row of Q, a column of the
sketch, a tensor of the sketch's tail), in one pass each instead of a dozen array operations.
Each is the float32 formula of `lowrank.codec.TorchRounding`, element by element, so the bits are
those of the torch operations."""
from __future__ import annotations

import numpy as np

from .common import jit


@jit
def line_peaks(x, line, peaks):
    """peaks[line[i]] = max(peaks[line[i]], |x[i]|); a NaN, once met, stays (torch's amax)."""
    for i in range(x.shape[0]):
        v, j = abs(x[i]), line[i]
        if v > peaks[j] or v != v:
            peaks[j] = v


@jit
def to_levels(x, line, scales, bound, ints, sent):
    """ints[i] = round(x[i] / s), s = scales[line[i]] (0 where s is not positive), clamped to
    +-bound when bound > 0; where `sent` is not empty, sent[i] = ints[i] * s: what was sent."""
    b, keep = np.float32(bound), sent.shape[0] > 0
    for i in range(x.shape[0]):
        s = scales[line[i]]
        v = np.rint(x[i] / s) if s > 0 else np.float32(0.0)
        if bound > 0:
            if v < -b:
                v = -b
            elif v > b:
                v = b
        ints[i] = v
        if keep:
            sent[i] = np.float32(ints[i]) * s


@jit
def from_levels(ints, line, scales, out):
    """out[i] = ints[i] * scales[line[i]]."""
    for i in range(ints.shape[0]):
        out[i] = np.float32(ints[i]) * scales[line[i]]


@jit
def to_pairs(x, line, scales, fines, bound, hi, lo):
    """Each x[i] as a fixed-point pair on its line's scale s and fine scale f: hi = round(x / s),
    lo = round((x - hi s) / f), each clamped to +-bound (0 where s is not positive)."""
    b = np.float32(bound)
    for i in range(x.shape[0]):
        s, f = scales[line[i]], fines[line[i]]
        h, low = np.float32(0.0), np.float32(0.0)
        if s > 0:
            h = np.rint(x[i] / s)
            if h < -b:
                h = -b
            elif h > b:
                h = b
            low = np.rint((x[i] - h * s) / f)
            if low < -b:
                low = -b
            elif low > b:
                low = b
        hi[i], lo[i] = h, low


@jit
def from_pairs(hi, lo, line, scales, fines, out):
    """out[i] = hi[i] * s + lo[i] * f on its line's scales."""
    for i in range(hi.shape[0]):
        j = line[i]
        out[i] = np.float32(hi[i]) * scales[j] + np.float32(lo[i]) * fines[j]
