"""The complete orthonormal bases greedylore chooses its directions from, shared by every rank."""
from __future__ import annotations

import functools
import math
from statistics import NormalDist

import numpy as np
import torch

from ..buffer import Buffer
from ..streams import Purpose, draw_normal, torch_stream
from .products import NOTHING_T


@functools.lru_cache(maxsize=256)
def noise_peak(k: int, n: int) -> float:
    """The largest of n independent chi-squared(k)/k draws, as its 1 - 1/n quantile (Wilson-Hilferty).

    A probe estimate of one direction's energy is that energy times chi-squared(k)/k; the largest of
    n such estimates is inflated by about this factor even when all n energies are equal."""
    if n <= 1:
        return 1.0
    z = NormalDist().inv_cdf(1 - 1 / n)
    a = 2 / (9 * k)
    return max(1.0, (1 - a + z * math.sqrt(a)) ** 3)


class Basis:
    """Per compressed matrix (oriented d x D), a complete d x d orthonormal basis B every rank holds
    bit for bit the same, and the energy of the global x-bar along each of its columns.

    A refresh (a dense step) sets B to the singular vectors of x-bar. Because B is complete,
    choosing directions by energy keeps at least the chosen share of it. `exchange` sums a round
    (with the uncompressed tensors in its tail when the compressor sends them there; `tail` is
    their size); `lead`: how many steps before compression starts the basis is first built."""

    lead = 0
    sketches = False  # whether the energies come from a round that can start in backward
    every = 200       # refresh interval when --refresh-every is left at its default
    CHECK_BYTES = 16  # the bases' checksum's round: two int64

    def __init__(self, dims: list[tuple[int, int, int]], ranks: list[int], indices: list[int], cfg, mm, wire,
                 exchange, tail: int):
        self.d, self.D, self.cap = ([dim[j] for dim in dims] for j in range(3))
        self.indices, self.cfg, self.mm, self.wire, self.exchange, self.tail = indices, cfg, mm, wire, exchange, tail
        device = wire.device
        self.every = cfg.refresh_every if cfg.refresh_every >= 0 else self.every
        self.k = cfg.probes
        self.bases = Buffer([(d, d) for d in self.d], device=device)
        self.warm = Buffer([(c, D) for c, D in zip(self.cap, self.D)], device=device)   # rows: last step's Q
        self.right = Buffer([(D, c + self.k) for c, D in zip(self.cap, self.D)], device=device)  # probes (and W)
        width = {"probe": self.k, "exact": None}[cfg.scores]
        self.scores = Buffer([(d, (c if self.sketches else 0) + (width or D)) for d, c, D in
                              zip(self.d, self.cap, self.D)], extra=tail, device=device)
        self.ranks = list(ranks)  # directions sent last step, per matrix (tracking: W's width)
        self.refreshed_at = -1
        self.rebroadcasts = 0
        self._exact: Buffer | None = None  # --scores exact's full projections (diagnostics)

    def is_refresh(self, step: int) -> bool:
        s0 = self.cfg.start_compress_step
        return (step - s0) % self.every == 0 if self.every else step == s0

    def refresh(self, xs: list[torch.Tensor], r: list[int], step: int) -> None:
        """B = the left singular vectors of each x (x-bar, summed already)."""
        for i, x in enumerate(xs):
            u, s, vt = torch.linalg.svd(x, full_matrices=False)
            self.bases.views[i].copy_(u)
            self.refreshed(i, s, vt, r[i])
        self.ranks = list(r)
        self.verify()
        self.refreshed_at = step

    def refreshed(self, i: int, s: torch.Tensor, vt: torch.Tensor, r: int) -> None:
        """What else a refresh sets from matrix i's singular values and right vectors."""

    def remember(self, ranks: list[int], sent: list[torch.Tensor]) -> None:
        """The directions each matrix sent this step, and their summed rows of Q."""
        self.ranks = ranks

    def energies(self, step: int, xs: list[torch.Tensor], sketched: bool) -> list[torch.Tensor]:
        """The paper's estimate: signed projections of the global x-bar on shared Gaussian probes."""
        exact = self.cfg.scores == "exact"
        scores = self.scores.carve([(d, D if exact else self.k) for d, D in zip(self.d, self.D)], self.tail)
        probes = self.right.carve([(D, self.k) for D in self.D])
        for i, (x, basis, out) in enumerate(zip(xs, self.bases.views, scores.views)):
            if exact:
                torch.matmul(basis.t(), x, out=out)
            else:  # O(d D k + d^2 k), never the O(d^2 D) full projection
                stream = torch_stream(self.cfg.seed, step, self.indices[i], Purpose.PROBE, self.mm.compiled)
                draw_normal(probes.views[i], stream)
                torch.matmul(basis.t(), x @ probes.views[i], out=out)
        self.exchange(scores)  # signed projections of the global x-bar
        return [v.square().mean(1) for v in scores.views]

    def verify(self, check: int | None = None) -> bool:
        """Every rank must project onto the same basis; if any differs, rank 0's wins (counted) and
        this says True. `check`: the bases' checksum (`Products.rotate_and_check`), computed here if
        not given. 63 of its 64 bits travel: any one changed value still changes those. (A CRC32
        would need a pass of its own over the bases.)"""
        if check is None:
            check = self.rotate_and_check([b[:, :0] for b in self.bases.views], [b[:0] for b in self.bases.views])[1]
        check &= 2**63 - 1
        both = np.array([check, -check], dtype=np.int64)
        self.wire.world.allreduce_(both, op="max")
        if both[0] == -both[1]:
            return False
        self.wire.bcast_(self.bases.flat)
        self.rebroadcasts += 1
        return True

    def rotate_and_check(self, us: list, yts: list) -> tuple[list[torch.Tensor], int]:
        """Each basis B rotated so that its first t columns are us[i] (t = 0: left as it is), then
        (yts[i] @ B for each, the bases' checksum): one pass over each basis."""
        jobs = [(basis, tri, vt, u, yt, int(first)) for basis, (tri, vt), u, yt, first
                in zip(self.bases.views, self.rotations(us), us, yts, self.bases.offsets)]
        return self.mm.rotate_and_check(jobs)

    def rotations(self, us: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each basis B and u (d x t), (T, V^T) with B - B V T V^T = B H, H orthogonal and the
        first t columns of B H equal to u up to rounding. H is the product of the t Householder
        reflectors from the QR of B^T u, in its compact form I - V T V^T (O(d^2 t); LAPACK's ormqr
        took twice the time and a d x d copy); `rotate_and_check` applies it."""
        utbs = [self.mm.scratch(("u^T B", i), (u.shape[1], d)) for i, (u, d) in enumerate(zip(us, self.d))]
        self.mm.products([(u.t(), basis, utb, None) for u, basis, utb in zip(us, self.bases.views, utbs) if u.shape[1]])
        reflectors = []
        for u, utb in zip(us, utbs):
            t = u.shape[1]
            if not t:
                reflectors.append((NOTHING_T, u.t()))
                continue
            reflectors.append(self.mm.reflectors(*torch.geqrf(utb.t())))
        return reflectors

    def state_dict(self, copy: bool = True) -> dict:
        bases, warm = self.bases.state(copy), self.warm.state(copy)
        return {"bases": bases, "refreshed_at": self.refreshed_at, "warm": warm,
                "ranks": np.array(self.ranks, dtype=np.int64)}

    def state_layout(self, names: list[str]) -> dict:
        return {"bases": [(n, (d, d)) for n, d in zip(names, self.d)],
                "warm": [(n, tuple(v.shape)) for n, v in zip(names, self.warm.views)],
                "ranks": [(n, ()) for n in names]}

    def load_state_dict(self, shared: dict) -> None:
        self.bases.load(shared["bases"])
        self.refreshed_at = int(shared["refreshed_at"])
        if "warm" in shared:
            self.warm.load(shared["warm"])
            self.ranks = [int(r) for r in shared["ranks"]]


class FixedBasis(Basis):
    """The paper's semi-lazy basis: the singular vectors of x-bar at the last refresh, kept until
    the next; energies from shared Gaussian probes (d x k floats per matrix travel)."""


class TrackingBasis(Basis):
    """A basis that follows the gradient, refreshed never by default. One Allreduce carries the
    sketch x [W | Omega'] (W: orth of last step's Q^T, a warm-started power step; Omega': shared
    probes with W projected out), and can start in backward (fp32). B is rotated by t Householder
    reflectors (O(d^2 t)) so that its first t columns are the left singular vectors of x-bar W and
    the others stay an orthonormal completion. Energies are exact inside span(W); on its
    complement they are unbiased probe estimates, discounted by the peak noise alone reaches there.
    Each direction sent costs its column of the next sketch too (`codec.Fp32Sketch.column_bytes`)."""

    lead = 1  # built on the last dense warm-up step, for free
    sketches = True
    every = 0
    _carved: tuple = (None,)

    def is_refresh(self, step: int) -> bool:
        return bool(self.every) and (step - self.cfg.start_compress_step + 1) % self.every == 0

    def refreshed(self, i: int, s: torch.Tensor, vt: torch.Tensor, r: int) -> None:
        """Tracking starts from x-bar's top right singular directions (W = x-bar^T U_r)."""
        self.warm.views[i][:r].copy_(vt[:r] * s[:r, None])

    def remember(self, ranks: list[int], sent: list[torch.Tensor]) -> None:
        for warm, q, r in zip(self.warm.views, sent, ranks):
            warm[:r].copy_(q)
        self.ranks = ranks

    def carved(self) -> tuple[Buffer, Buffer]:
        """(the sketches x [W | Omega'] with the tail after them, the right factors: rows W^T, then
        the probes) at this step's widths; carved again only when the widths move."""
        key = tuple(self.ranks)
        if self._carved[0] != key:
            self._carved = (key, self.scores.carve([(d, t + self.k) for d, t in zip(self.d, key)], self.tail),
                            self.right.carve([(t + self.k, D) for t, D in zip(key, self.D)]))
        return self._carved[1:]

    def sketch(self) -> Buffer:
        """The sketches x [W | Omega'] (and after them the tail)."""
        return self.carved()[0]

    def sketch_job(self, i: int, step: int, x: torch.Tensor, plus: torch.Tensor | None) -> tuple:
        """x [W | Omega'] as a job of `Products.products` ((x + plus) first, when given)."""
        t = self.ranks[i]
        sketch, right = self.carved()
        right = right.views[i]
        w, probes = right[:t], right[t:]
        stream = torch_stream(self.cfg.seed, step, self.indices[i], Purpose.PROBE, self.mm.compiled)
        draw_normal(probes, stream)
        if t:
            w.copy_(torch.linalg.qr(self.warm.views[i][:t].t()).Q.t())
            probes.sub_((probes @ w.t()) @ w)
        return x, right.t(), sketch.views[i], plus

    def energies(self, step: int, xs: list[torch.Tensor], sketched: bool) -> list[torch.Tensor]:
        """One Allreduce of the sketches (unless `sketched`: it ran already); each basis rotated
        toward x-bar W; the energies."""
        sketch = self.sketch()
        if not sketched:
            self.mm.products([self.sketch_job(i, step, x, None) for i, x in enumerate(xs)])
            self.exchange(sketch)  # x-bar [W | Omega'] for every matrix
        us = [torch.linalg.svd(y[:, :t], full_matrices=False).U if t else y[:, :0]
              for y, t in zip(sketch.views, self.ranks)]
        yts = [y.t() for y in sketch.views]
        products, check = self.rotate_and_check(us, yts)  # (B^T y)^T for each rotated basis B
        if self.verify(check):  # before any choice is made from them: rank 0's replaced ours
            products = self.rotate_and_check([y[:, :0] for y in sketch.views], yts)[0]
        energies = []
        for e, t in zip(products, self.ranks):
            e = e.square()
            energy = e[:t].sum(0)
            # exact inside span(W); on its complement a probe estimate, discounted by the peak that
            # noise alone reaches among the complement's directions (measured: undiscounted noisy
            # picks displaced tracked directions and cost 0.04 bpc on the LM)
            energies.append(energy.add_(e[t:].mean(0) / noise_peak(self.k, len(energy) - t)))
        if self.cfg.scores == "exact":  # diagnostics: the true energies over the rotated bases (d x D each)
            if self._exact is None:
                self._exact = Buffer([(d, D) for d, D in zip(self.d, self.D)], device=self.wire.device)
            exact = self._exact
            for x, basis, out in zip(xs, self.bases.views, exact.views):
                torch.matmul(basis.t(), x, out=out)
            self.wire.allreduce_(exact.flat)
            energies = [v.square().sum(1) for v in exact.views]
        return energies
