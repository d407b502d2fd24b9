"""Spherical compression's candidate search."""
from __future__ import annotations

import numpy as np

from .common import U, _mix, inline, jit


# -- spherical compression's candidate search -------------------------------------------------------------


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
