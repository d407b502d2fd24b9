"""How much of the global x-bar a low-rank compressor keeps (--contraction-every): measured on
some steps at the price of one extra dense Allreduce, reported beside the best rank-r share."""
from __future__ import annotations

import torch

from ..buffer import Buffer


def measuring(cfg, step: int) -> bool:
    every = cfg.contraction_every
    return bool(every) and (step + 1) % every == 0


def global_inputs(c) -> Buffer:
    """x-bar of every matrix compressor `c` compresses (an Allreduce counted like any other)."""
    xbar = Buffer([(s.n, s.m) for s in c.slots], device=c.layout.device)
    for i, v in enumerate(xbar.views):
        v.copy_(c.grad(i))
    c.wire.allreduce_(xbar.flat)
    c.stats["measuring_bytes"] = xbar.flat.nbytes  # counted in wire bytes; not part of the method
    return xbar


def record(c, xbar: Buffer) -> list[float]:
    """Into c.stats, with c's gradients now C(x-bar): contraction = ||x-bar - C(x-bar)||^2 /
    ||x-bar||^2 over the compressed matrices; captured = 1 - contraction; captured_optimal = the
    share the best rank-r approximation of each matrix (r = --rank) would hold: what an exact
    truncated SVD of x-bar would send. Returns each matrix's ratio."""
    num = [float((xbar.views[i] - c.grad(i)).square().sum()) for i in range(len(c.slots))]
    den = [float(v.square().sum()) for v in xbar.views]
    best = [float(torch.linalg.svdvals(v)[:r].square().sum()) for v, r in zip(xbar.views, c.r)]
    ratios = [a / b if b > 0 else 0.0 for a, b in zip(num, den)]
    total = sum(den)
    c.stats["contraction"] = sum(num) / total if total > 0 else 0.0
    c.stats["captured"] = 1 - c.stats["contraction"]
    c.stats["captured_optimal"] = sum(best) / total if total > 0 else 0.0
    c.stats["energy_share"] = [d / total if total > 0 else 0.0 for d in den]
    c.stats["captured_per_matrix"] = [1 - r for r in ratios]
    return ratios
