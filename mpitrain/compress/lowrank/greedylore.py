"""GreedyLore: greedy low-rank compression with error feedback over a complete orthonormal basis."""
from __future__ import annotations

import torch

from ..base import register
from ..buffer import Buffer
from .base import LowRank
from .basis import FixedBasis, TrackingBasis
from .codec import CompiledRounding, Fp32Factors, Fp32Sketch, Int16Factors, Int16Sketch, TorchRounding
from .selector import selector_class


@register
class GreedyLore(LowRank):
    """Per compressed matrix the ranks share a complete d x d orthonormal basis B. Every step each
    direction's energy in the global x-bar = sum_i (g_i + e_i) is estimated, the directions are
    chosen greedily by energy, and Q = P^T x travels in one Allreduce. Because B is complete,
    choosing by energy keeps at least the chosen share of it: the compressor contracts at every
    step (delta = r/d per matrix; see `Global.contraction_bound` for global allocation).

    Each mode is a choice of part:
      basis       (`basis.py`) fixed: the paper's semi-lazy basis; tracking: one that follows the
                  gradient, its sketch round (fp32) overlapped with backward;
      selector    (`selector.py`) greedy per matrix or by a global allocation, random, or lazy;
      factors     (`codec.py`) fp32, or int16 on shared scales (which needs greedy selection,
                  whose first round carries the uncompressed tensors);
      sketch      (`codec.py`) that first round as int16 on shared scales, its bytes saved
                  buying directions under the same budget (the LM: 0.07 bpc at 600 steps), or fp32.
    The budget (not greedylore-paper): --rank r buys what powersgd sends at rank r, probes first.
    `refresh_residual`: what a dense refresh does with the error-feedback residual: flush it into
    the dense exchange (then zero it), keep it for the next compressed step, or drop it.
    """

    name = "greedylore"
    published = False  # True: --rank is the literal rank, as in the paper

    def eligible(self, slot) -> bool:
        return min(slot.n, slot.m) > self.cfg.min_compression_rate * self.cfg.rank

    def variant(self, cfg) -> tuple[str, str, str, int, int]:
        return cfg.basis, cfg.allocation, cfg.refresh_residual, cfg.factor_bits, cfg.sketch_bits

    def __init__(self, layout, world, cfg):
        super().__init__(layout, world, cfg)
        basis, allocation, self.refresh_residual, factor_bits, sketch_bits = self.variant(cfg)
        Selector = selector_class(cfg.select, allocation)
        Codec = Int16Factors if factor_bits == 16 and Selector.needs_energies else Fp32Factors
        Sketch = Int16Sketch if sketch_bits == 16 else Fp32Sketch
        Basis = TrackingBasis if basis == "tracking" else FixedBasis
        self.dense_first, self.linear = Codec.dense_first, Codec.linear
        groups = self.dense_groups() if self.dense_first else []  # the tensors in the first round's tail
        # per direction: its row of Q, and (tracking) its column of the next step's sketch
        self.cost = [Codec.row_bytes(D) + (Sketch.column_bytes(d) if Basis.sketches else 0)
                     for d, D in zip(self.d, self.D)]
        if self.published:
            self.budget = sum(r * c for r, c in zip(self.r, self.cost))
        else:  # --rank r buys what powersgd sends at rank r, probes, the bases' check and the tail's scales
            # paid; at least one direction per matrix
            spend = [4 * cfg.rank * (s.n + s.m) - cfg.probes * Sketch.column_bytes(d) for s, d in zip(self.slots, self.d)]
            self.budget = max(sum(self.cost), sum(spend) - Basis.CHECK_BYTES - Sketch.tail_bytes(len(groups)))
            self.r = self.afford(spend)
        # a matrix never gets more directions than would save min_compression_rate over dense
        rate = max(cfg.min_compression_rate, 1.0)
        cap = [max(r, min(d, int(d * D / ((d + D) * rate)))) if allocation == "global" else r
               for r, d, D in zip(self.r, self.d, self.D)]
        indices = [s.index for s in self.slots]
        rounding = CompiledRounding() if self.compiled else TorchRounding()
        if self.compiled and (Codec is Int16Factors or Sketch is Int16Sketch):
            rounding.preload()
        self.codec = Codec(cap, self.D, self.wire, rounding)
        self.basis = Basis(list(zip(self.d, self.D, cap)), self.r, indices, cfg, self.mm, self.wire,
                           self.exchange_first_round, self.dense_numel if self.dense_first else 0)
        self.sketch = Sketch(self.basis.scores, groups, self.wire, rounding)
        self.selector = Selector(self.r, self.d, cap, self.cost, self.budget, cfg.seed, indices)
        self.p = Buffer([(d, c) for d, c in zip(self.d, cap)], device=layout.device)
        self.payload = Buffer([(c, D) for c, D in zip(cap, self.D)], extra=self.dense_numel, device=layout.device)

    def afford(self, spend: list[int]) -> list[int]:
        """Directions per matrix: each its own share of the budget rounded down, then what is left
        over buys one more direction for the largest remainders first (rounding every matrix down
        left 6% of powersgd's bytes unspent on the bundled transformer)."""
        ranks = [max(1, min(d, x // c)) for x, d, c in zip(spend, self.d, self.cost)]
        left = self.budget - sum(r * c for r, c in zip(ranks, self.cost))
        for i in sorted(range(len(ranks)), key=lambda i: (ranks[i] - spend[i] / self.cost[i], i)):
            if self.cost[i] <= left and ranks[i] < self.d[i]:
                ranks[i] += 1
                left -= self.cost[i]
        return ranks

    def aggregate(self, step: int) -> None:
        self.next_step = step + 1
        s0, basis = self.cfg.start_compress_step, self.basis
        if not self.slots or step < s0 - basis.lead:
            self.base_stats(False)
            return self.dense_round()
        if step < s0 or basis.refreshed_at < 0 or basis.is_refresh(step):
            return self.refresh(step)
        sketched = self.first_round_overlaps(step)  # the tracking sketch: its round may have started in backward
        if sketched:
            self.run_first_round(step)
        else:
            self.add_residuals()
        self.base_stats(True)
        self.stats["refresh"] = False
        xbar = self.measure(step)
        ranks, chosen = self.select(step, sketched)
        tail = 0 if self.dense_first else self.dense_numel
        payload = self.payload.carve([(r, D) for r, D in zip(ranks, self.D)], tail)
        projectors = self.p.carve([(d, r) for d, r in zip(self.d, ranks)])
        for i, idx in enumerate(chosen):
            torch.index_select(basis.bases.views[i], 1, idx.to(self.layout.device), out=projectors.views[i])
        self.mm.products([(p.t(), self.oriented(self.grad(i)), q, None)
                          for i, (p, q) in enumerate(zip(projectors.views, payload.views))])
        self.codec.round(payload, sum(ranks))
        factors = [self.factors(self.grad(i), p, q) for i, (p, q) in enumerate(zip(projectors.views, payload.views))]
        own = self.own_q(payload)
        sent = [self.factors(self.grad(i), p, q) for i, (p, q) in enumerate(zip(projectors.views, own.views))] \
            if own else [None] * len(factors)
        self.codec.exchange(payload, self.allreduce_with_dense)  # every Q summed
        self.residuals_and_sums(sent, factors)
        basis.remember(ranks, payload.views)
        self.stats["ranks"] = list(ranks)
        if xbar is not None:
            self.record_contraction(xbar)
            self.stats["contraction_bound"] = self.selector.contraction_bound()

    def refresh(self, step: int):
        """A dense step: the bases become the singular vectors of the average."""
        if self.refresh_residual == "flush":
            self.add_residuals()
        self.dense_round()
        if self.refresh_residual != "keep":
            self.feedback.reset()
        self.basis.refresh([self.oriented(self.grad(i)) for i in range(len(self.slots))], self.r, step)
        self.base_stats(False)
        self.stats["refresh"] = True
        self.stats["ranks"] = list(self.r)  # W's width for the next step

    def select(self, step: int, sketched: bool = False) -> tuple[list[int], list[torch.Tensor]]:
        """How many directions each matrix sends, and which (the same on every rank); `sketched`:
        the tracking sketch's round has run already."""
        xs = [self.oriented(self.grad(i)) for i in range(len(self.slots))]
        energies = self.basis.energies(step, xs, sketched) if self.selector.needs_energies else None
        if energies is not None:
            energies = [e.cpu() for e in energies]  # d values a matrix: chosen on the host, wherever x lives
        return self.selector.choose(step, energies)

    # -- the tracking sketch: the first round, which can start in backward (fp32) -------------
    def first_round_overlaps(self, step: int) -> bool:
        return (self.basis.sketches and self.selector.needs_energies and self.cfg.scores == "probe"
                and self.sketch.overlaps
                and bool(self.slots) and step >= self.cfg.start_compress_step and self.basis.refreshed_at >= 0
                and not self.basis.is_refresh(step))

    def first_round(self) -> Buffer:
        return self.basis.sketch()

    def exchange_first_round(self, buf: Buffer) -> None:
        if self.sketch.linear:
            return super().exchange_first_round(buf)
        if self.dense_first:
            self.pack_dense(buf.tail)
        self.sketch.sum(buf)
        if self.dense_first:
            self.unpack_dense(buf.tail)

    def dense_groups(self) -> list[int]:
        """The lengths of the uncompressed tensors (and of the control words) as they ride in a tail."""
        bounds = sorted({s.offset for s in self.layout.slots} | {self.layout.numel})
        groups = []
        for a, b in self.dense_runs:
            cuts = [a] + [c for c in bounds if a < c < b] + [b]
            groups += [y - x for x, y in zip(cuts, cuts[1:])]
        return groups

    def first_round_product(self, i: int, step: int, add_residual: bool) -> tuple:
        residual = self.feedback.kept(i) if add_residual else None
        return self.basis.sketch_job(i, step, self.oriented(self.grad(i)),
                                     None if residual is None else self.oriented(residual))

    def state_dict(self, copy: bool = True) -> dict:
        state = super().state_dict(copy)
        state["shared"] = self.basis.state_dict(copy)
        return state

    def state_layout(self) -> dict:
        return {**super().state_layout(), **self.basis.state_layout([s.name for s in self.slots])}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.basis.load_state_dict(state["shared"])


@register
class GreedyLorePaper(GreedyLore):
    """The published algorithm as first built here: fixed semi-lazy basis, r per matrix, the
    residual flushed into each refresh."""

    name = "greedylore-paper"
    published = True

    def variant(self, cfg) -> tuple[str, str, str, int, int]:
        return "fixed", "per-matrix", "flush", 32, 32
