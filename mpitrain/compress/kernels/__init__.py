"""Compiled loops (numba), one module per family: `fields` (bitcodec's bit fields), `quantizers`
(their draws and fused passes), `spherical` (its candidate search), `lowrank` (skinny products, the
residual-and-reconstruction pass, Gram-Schmidt), `bases` (greedylore's basis pass and its reflectors)
and `rounds` (greedylore's 16-bit rounds).

Imported on first use, so a run that neither quantizes nor compresses to low rank never loads
numba. Everything here is plain IEEE arithmetic in a fixed order (no fastmath), so the codes are
those of the array formulas they replace, with one exception: `right_product`'s dot products
(see `reassociating`). Kernels compile once per machine and source (cache=True) into __pycache__.

Writers OR bits into a zeroed byte buffer at a bit position and return the new position; the caller
has made the buffer large enough. Readers return the new position, or a negative error code:
TRUNCATED when the bits run out, TOO_LONG when a unary run passes its cap.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba

# numba keys a cached kernel by its own file only, and kernels here inline helpers from the other
# files: so that editing a helper can never leave a stale compiled caller behind, the cache lives in
# a folder named by a digest of every kernel source (set before the modules below are compiled).
_SOURCES = sorted(Path(__file__).resolve().parent.glob("*.py"))
_DIGEST = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES)).hexdigest()[:16]
numba.config.CACHE_DIR = os.path.join(numba.config.CACHE_DIR or str(_SOURCES[0].parent / "__pycache__"),
                                      f"kernels-{_DIGEST}")

from .common import BAD_CODE, ERRORS, NOT_POSITIVE, PAST_END, TOO_LONG, TRUNCATED
from .fields import (LEADING_ONES, write_fixed, write_unary, write_gamma, write_rice, unary_bits, gamma_bits,
                     read_fixed, read_unary, read_gamma, read_rice, padding_is_clean)
from .quantizers import (seed_sequence, philox_uniform, stochastic_levels, scaled_signed, positions, rice_gap_bits,
                         write_levels, read_levels, write_sparse_gamma, sparse_gamma_bits, natural_codes, write_natural,
                         read_natural, accumulate, narrow, norm)
from .spherical import spherical_first
from .lowrank import (residual_and_sum, LEFT_TILE, LINE, ROWS_IN_CACHE, left_product, orthogonalize,
                      right_product)
from .bases import BASIS_BLOCK, position_weights, reflectors, rotate_rows
from .rounds import line_peaks, to_levels, from_levels, to_pairs, from_pairs

__all__ = ["BAD_CODE", "ERRORS", "NOT_POSITIVE", "PAST_END", "TOO_LONG", "TRUNCATED", "LEADING_ONES",
           "write_fixed", "write_unary", "write_gamma", "write_rice", "unary_bits", "gamma_bits",
           "read_fixed", "read_unary", "read_gamma", "read_rice", "padding_is_clean", "seed_sequence", "philox_uniform",
           "stochastic_levels", "scaled_signed", "positions", "rice_gap_bits", "write_levels", "read_levels",
           "write_sparse_gamma", "sparse_gamma_bits", "natural_codes", "write_natural", "read_natural", "accumulate",
           "narrow", "norm", "spherical_first", "residual_and_sum", "LEFT_TILE", "LINE", "ROWS_IN_CACHE",
           "left_product", "orthogonalize", "right_product", "BASIS_BLOCK", "position_weights", "reflectors",
           "rotate_rows", "line_peaks", "to_levels", "from_levels", "to_pairs", "from_pairs"]
