"""What every family of compiled loops shares: the decorators, the error codes, 64-bit mixing.

No reference counting (_nrt=False): an incref/decref of a buffer per helper call costs 10x, so
kernels never allocate: scratch arrays come from the caller. Everything is plain IEEE arithmetic in
a fixed order (no fastmath) unless a kernel says otherwise. Kernels compile once per machine
(cache=True) into __pycache__.
"""
from __future__ import annotations

import numpy as np
from numba import njit

TRUNCATED, TOO_LONG, NOT_POSITIVE, PAST_END, BAD_CODE = -1, -2, -3, -4, -5
ERRORS = {TRUNCATED: "payload is truncated", TOO_LONG: "payload holds a run longer than allowed",
          PAST_END: "the support runs past the end of the tensor", BAD_CODE: "payload holds a code that is not used"}
jit = njit(cache=True, nogil=True, _nrt=False)
inline = njit(cache=True, inline="always", _nrt=False)
U = np.uint64


@inline
def _mix(x):
    """SplitMix64's finaliser, as quantize._mix (uint64 arithmetic wraps)."""
    x = x + U(0x9E3779B97F4A7C15)
    x = (x ^ (x >> U(30))) * U(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> U(27))) * U(0x94D049BB133111EB)
    return x ^ (x >> U(31))
