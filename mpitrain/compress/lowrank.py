"""Low-rank compressors whose projector is shared by every rank: GreedyLore and PowerSGD.

Because every rank projects with the same P, compression is linear and commutes with the sum:
sum_i P P^T x_i = P P^T sum_i x_i. So the payloads are summed with Allreduce, and the whole
trajectory depends on the ranks' residuals only through their sum.

Each matrix X (n x m) is handled in its oriented form Xt (d x D, d = min(n, m)): X itself when
n <= m, X^T otherwise, so the basis is always d x d and the payload r x D. Every Q, and every
tensor that is not compressed, travels in ONE contiguous Allreduce per round; the layout's
control words ride in it too.
"""
from __future__ import annotations

import re
import zlib

import numpy as np
import torch

from .base import Compressor, register


def generator(*key: int) -> torch.Generator:
    """A torch generator determined by the key (seed, step, layer, purpose): identical on every
    rank without communication, and identical again after a resume."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> 1))
    return g


PROBE, RANDOM_SELECT, POWER_INIT = 1, 2, 3  # the purposes of shared random draws


class Buffer:
    """One contiguous fp32 buffer and named 2-D views into it, allocated once."""

    def __init__(self, shapes: list[tuple[int, int]], extra: int = 0):
        sizes = [a * b for a, b in shapes]
        self.flat = torch.zeros(sum(sizes) + extra)
        self.np = self.flat.numpy()
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.views = [self.flat[o:o + a * b].view(a, b) for o, (a, b) in zip(offsets, shapes)]
        self.tail = self.flat[offsets[-1]:]


class LowRank(Compressor):
    """What the low-rank compressors share: which matrices, residuals, the payload round."""

    def __init__(self, layout, world, cfg):
        super().__init__(layout, world, cfg)
        skip = re.compile(cfg.uncompressed) if cfg.uncompressed else None
        self.slots = [s for s in layout.matrices if self.eligible(s) and not (skip and skip.search(s.name))]
        self.r = [min(cfg.rank, s.n, s.m) for s in self.slots]
        self.d = [min(s.n, s.m) for s in self.slots]
        self.D = [max(s.n, s.m) for s in self.slots]
        self.residual = Buffer([(s.n, s.m) for s in self.slots])
        # stretches of the flat buffer that travel uncompressed (control words included)
        compressed = {s.index for s in self.slots}
        self.dense_runs, start = [], 0
        for s in layout.slots:
            if s.index in compressed:
                if s.offset > start:
                    self.dense_runs.append((start, s.offset))
                start = s.offset + s.numel
        self.dense_runs.append((start, layout.flat.numel()))
        self.dense_numel = sum(b - a for a, b in self.dense_runs)
        self.last_ratios: list[float] = []

    def eligible(self, slot) -> bool:
        raise NotImplementedError

    # -- views ------------------------------------------------------------------------------
    def grad(self, i: int) -> torch.Tensor:
        return self.layout.matrix(self.layout.grads, self.slots[i])

    def oriented(self, x: torch.Tensor) -> torch.Tensor:
        """d x D view of an n x m matrix (a transpose, never a copy)."""
        return x if x.shape[0] <= x.shape[1] else x.t()

    @staticmethod
    def factors(x: torch.Tensor, p: torch.Tensor, q: torch.Tensor):
        """(left, right) with left @ right = the n x m matrix whose oriented form is P Q."""
        return (p, q) if x.shape[0] <= x.shape[1] else (q.t(), p.t())

    # -- rounds -----------------------------------------------------------------------------
    def dense_round(self):
        self.world.allreduce_(self.layout.flat_np)

    def add_residuals(self):
        if self.error_feedback:
            for i in range(len(self.slots)):
                self.grad(i).add_(self.residual.views[i])

    def pack_dense(self, tail: torch.Tensor):
        at = 0
        for a, b in self.dense_runs:
            tail[at:at + b - a].copy_(self.layout.flat[a:b])
            at += b - a

    def unpack_dense(self, tail: torch.Tensor):
        at = 0
        for a, b in self.dense_runs:
            self.layout.flat[a:b].copy_(tail[at:at + b - a])
            at += b - a

    def keep_residual(self, i: int, left: torch.Tensor, right: torch.Tensor):
        """e = x - left @ right: what this rank's own share of the reconstruction leaves out
        (computed before the sum overwrites the payload)."""
        if self.error_feedback:
            e = self.residual.views[i]
            e.copy_(self.grad(i))
            e.addmm_(left, right, alpha=-1.0)

    # -- measurement --------------------------------------------------------------------------
    def measuring(self, step: int) -> bool:
        every = self.cfg.contraction_every
        return bool(every) and (step + 1) % every == 0

    def global_inputs(self) -> Buffer:
        """x-bar of every compressed matrix (one extra dense Allreduce, counted like any other)."""
        xbar = Buffer([(s.n, s.m) for s in self.slots])
        for i, v in enumerate(xbar.views):
            v.copy_(self.grad(i))
        self.world.allreduce_(xbar.np)
        return xbar

    def record_contraction(self, xbar: Buffer):
        num = [float((xbar.views[i] - self.grad(i)).square().sum()) for i in range(len(self.slots))]
        den = [float(v.square().sum()) for v in xbar.views]
        self.last_ratios = [a / b if b > 0 else 0.0 for a, b in zip(num, den)]
        self.stats["contraction"] = sum(num) / sum(den) if sum(den) > 0 else 0.0

    def base_stats(self, compressed: bool):
        self.stats = {"compressed_matrices": len(self.slots) if compressed else 0}

    def state_dict(self) -> dict:
        return {"local": {"residual": self.residual.np.copy()}, "shared": {}}

    def load_state_dict(self, state: dict) -> None:
        residual = state["local"].get("residual")  # absent after ef_resume=reset: start from zero
        self.residual.np[...] = 0.0 if residual is None else residual


@register
class GreedyLore(LowRank):
    """Greedy low-rank compression with error feedback and a semi-lazy subspace.

    Refresh steps (the first compressed-phase step, then every `refresh_every`): Allreduce
    x = g + e densely (the residual is flushed, not dropped), zero e, and keep the complete d x d
    left singular basis of the average (fp32, verified identical on every rank). Other steps:
    estimate each basis direction's energy in the global x-bar with shared probes, keep the top r
    (`select=greedy`), send Q = P^T x. With a complete basis the top r by energy hold at least
    r/d of it, so the compressor contracts at every step with delta = r/d.
    """

    name = "greedylore"

    def eligible(self, slot) -> bool:
        return min(slot.n, slot.m) > self.cfg.min_compression_rate * self.cfg.rank

    def __init__(self, layout, world, cfg):
        super().__init__(layout, world, cfg)
        self.bases = Buffer([(d, d) for d in self.d])
        self.p = Buffer([(d, r) for d, r in zip(self.d, self.r)])
        self.payload = Buffer([(r, D) for r, D in zip(self.r, self.D)], extra=self.dense_numel)
        width = {"probe": [cfg.probes] * len(self.d), "exact": self.D}[cfg.scores]
        self.scores = Buffer([(d, k) for d, k in zip(self.d, width)])
        self.probes = Buffer([(D, cfg.probes) for D in self.D])
        self.probed = Buffer([(d, cfg.probes) for d in self.d])
        self.refreshed_at = -1
        self.basis_rebroadcasts = 0

    def is_refresh(self, step: int) -> bool:
        return (step - self.cfg.start_compress_step) % self.cfg.refresh_every == 0

    def aggregate(self, step: int) -> None:
        if step < self.cfg.start_compress_step or not self.slots:
            self.base_stats(False)
            return self.dense_round()
        self.add_residuals()
        if self.is_refresh(step) or self.refreshed_at < 0:
            return self.refresh(step)
        self.base_stats(True)
        self.stats["refresh"] = False
        xbar = self.global_inputs() if self.measuring(step) else None
        factors = []
        for i, idx in enumerate(self.select(step)):
            x, p, q = self.grad(i), self.p.views[i], self.payload.views[i]
            torch.index_select(self.bases.views[i], 1, idx, out=p)
            torch.matmul(p.t(), self.oriented(x), out=q)
            factors.append(self.factors(x, p, q))
            self.keep_residual(i, *factors[-1])
        self.pack_dense(self.payload.tail)
        self.world.allreduce_(self.payload.np)  # every Q summed, and the dense tensors with them
        for i, (left, right) in enumerate(factors):
            torch.matmul(left, right, out=self.grad(i))
        self.unpack_dense(self.payload.tail)
        if xbar is not None:
            self.record_contraction(xbar)
            self.stats["contraction_bound"] = max(1 - r / d for r, d in zip(self.r, self.d))

    def refresh(self, step: int):
        self.dense_round()
        self.residual.flat.zero_()
        for i in range(len(self.slots)):
            u, _, _ = torch.linalg.svd(self.oriented(self.grad(i)), full_matrices=False)
            self.bases.views[i].copy_(u)
        self.verify_bases()
        self.refreshed_at = step
        self.base_stats(False)
        self.stats["refresh"] = True

    def verify_bases(self):
        """Every rank must project onto the same basis; if any differs, rank 0's wins (counted)."""
        crc = zlib.crc32(self.bases.np.tobytes())
        both = np.array([crc, -crc], dtype=np.int64)
        self.world.allreduce_(both, op="max")
        if both[0] != -both[1]:
            self.world.bcast_(self.bases.np)
            self.basis_rebroadcasts += 1

    def select(self, step: int) -> list[torch.Tensor]:
        """Indices of the r basis directions each matrix sends this step (the same on every rank)."""
        cfg = self.cfg
        if cfg.select == "lazy":
            return [torch.arange(r) for r in self.r]
        if cfg.select == "random":
            return [torch.randperm(d, generator=generator(cfg.seed, step, s.index, RANDOM_SELECT))[:r]
                    for s, d, r in zip(self.slots, self.d, self.r)]
        for i, s in enumerate(self.slots):
            x, basis, out = self.oriented(self.grad(i)), self.bases.views[i], self.scores.views[i]
            if cfg.scores == "exact":
                torch.matmul(basis.t(), x, out=out)
            else:  # O(d D k + d^2 k), never the O(d^2 D) full projection
                probes, probed = self.probes.views[i], self.probed.views[i]
                torch.randn(probes.shape, generator=generator(cfg.seed, step, s.index, PROBE), out=probes)
                torch.matmul(x, probes, out=probed)
                torch.matmul(basis.t(), probed, out=out)
        self.world.allreduce_(self.scores.np)  # signed projections of the global x-bar
        return [torch.argsort(v.square().mean(1), descending=True, stable=True)[:r]
                for v, r in zip(self.scores.views, self.r)]

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["shared"] = {"bases": self.bases.np.copy(), "refreshed_at": self.refreshed_at}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.bases.np[...] = state["shared"]["bases"]
        self.refreshed_at = int(state["shared"]["refreshed_at"])


@register
class PowerSGD(LowRank):
    """PowerSGD (Vogels et al. 2019): one power-iteration step per training step, warm-started.

    P = orth(sum_i X_i Q) in one Allreduce of every P; Q = sum_i X_i^T P in one Allreduce that also
    carries every uncompressed tensor; the update is P Q^T. The residual is the local
    x - P P^T x, whose sum over ranks equals that of the reference hook's x - P Q^T.
    """

    name = "powersgd"

    def eligible(self, slot) -> bool:
        return (slot.n + slot.m) * self.cfg.rank * self.cfg.min_compression_rate < slot.n * slot.m

    def __init__(self, layout, world, cfg):
        super().__init__(layout, world, cfg)
        self.p = Buffer([(s.n, r) for s, r in zip(self.slots, self.r)])
        self.payload = Buffer([(s.m, r) for s, r in zip(self.slots, self.r)], extra=self.dense_numel)
        self.q = Buffer([(s.m, r) for s, r in zip(self.slots, self.r)])
        for s, q in zip(self.slots, self.q.views):
            q.copy_(torch.randn(q.shape, generator=generator(cfg.seed, 0, s.index, POWER_INIT)))

    def aggregate(self, step: int) -> None:
        if step < self.cfg.start_compress_step or not self.slots:
            self.base_stats(False)
            return self.dense_round()
        self.add_residuals()
        self.base_stats(True)
        xbar = self.global_inputs() if self.measuring(step) else None
        if not self.cfg.warm_start:
            for s, q in zip(self.slots, self.q.views):
                q.copy_(torch.randn(q.shape, generator=generator(self.cfg.seed, step, s.index, POWER_INIT)))
        for i, p in enumerate(self.p.views):
            torch.matmul(self.grad(i), self.q.views[i], out=p)
        self.world.allreduce_(self.p.np)
        for i, p in enumerate(self.p.views):
            self.orthogonalize(p)
            q = self.payload.views[i]
            torch.matmul(self.grad(i).t(), p, out=q)
            self.keep_residual(i, p, q.t())
        self.pack_dense(self.payload.tail)
        self.world.allreduce_(self.payload.np)
        for i, p in enumerate(self.p.views):
            torch.matmul(p, self.payload.views[i].t(), out=self.grad(i))
            self.q.views[i].copy_(self.payload.views[i])
        self.unpack_dense(self.payload.tail)
        if xbar is not None:
            self.record_contraction(xbar)

    def orthogonalize(self, p: torch.Tensor):
        """Gram-Schmidt on the columns, in place; epsilon keeps an all-zero column finite.
        Each projection is applied twice: one classical pass loses orthogonality in fp32
        (errors of 1e-4 at full rank, measured), two are accurate to rounding."""
        eps = self.cfg.orthogonalization_epsilon
        for j in range(p.shape[1]):
            col = p[:, j]
            for _ in range(2 if j else 0):
                col -= p[:, :j] @ (p[:, :j].t() @ col)
            col /= col.norm() + eps

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["shared"] = {"q": self.q.np.copy()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.q.np[...] = state["shared"]["q"]
