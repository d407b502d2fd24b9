"""PowerSGD (Vogels et al. 2019)."""
from __future__ import annotations

import torch

from ..base import register
from ..buffer import Buffer
from ..streams import Purpose, draw_normal, torch_stream
from .base import LowRank


@register
class PowerSGD(LowRank):
    """PowerSGD: one power-iteration step per training step, warm-started.

    P = orth(sum_i X_i Q) in one Allreduce of every P; Q = sum_i X_i^T P in one Allreduce that also
    carries every uncompressed tensor; the update is P Q^T. The residual is the local
    x - P P^T x, whose sum over ranks equals that of the reference hook's x - P Q^T.
    """

    name = "powersgd"

    def eligible(self, slot) -> bool:
        return (slot.n + slot.m) * self.cfg.rank * self.cfg.min_compression_rate < slot.n * slot.m

    def __init__(self, layout, world, cfg):
        super().__init__(layout, world, cfg)
        device = layout.device
        self.p = Buffer([(s.n, r) for s, r in zip(self.slots, self.r)], device=device)
        self.payload = Buffer([(s.m, r) for s, r in zip(self.slots, self.r)], extra=self.dense_numel, device=device)
        self.q = Buffer([(s.m, r) for s, r in zip(self.slots, self.r)], device=device)
        for s, q in zip(self.slots, self.q.views):
            draw_normal(q, torch_stream(cfg.seed, 0, s.index, Purpose.POWER_INIT))

    def first_round_overlaps(self, step: int) -> bool:
        return step >= self.cfg.start_compress_step and self.cfg.warm_start

    def first_round(self) -> Buffer:
        return self.p

    def first_round_product(self, i: int, step: int, add_residual: bool) -> tuple:
        """P = X Q."""
        if not self.cfg.warm_start:
            s, q = self.slots[i], self.q.views[i]
            draw_normal(q, torch_stream(self.cfg.seed, step, s.index, Purpose.POWER_INIT))
        return (self.grad(i), self.q.views[i], self.p.views[i], self.feedback.kept(i) if add_residual else None)

    def aggregate(self, step: int) -> None:
        self.next_step = step + 1
        if step < self.cfg.start_compress_step or not self.slots:
            self.base_stats(False)
            return self.dense_round()
        self.run_first_round(step)
        self.base_stats(True)
        xbar = self.measure(step)
        for p in self.p.views:
            self.orthogonalize(p)
        self.mm.products([(self.grad(i).t(), p, q, None) for i, (p, q) in enumerate(zip(self.p.views, self.payload.views))])
        own = self.own_q(self.payload)
        sent = [(p, q.t()) for p, q in zip(self.p.views, own.views)] if own else [None] * len(self.slots)
        self.allreduce_with_dense(self.payload)
        self.residuals_and_sums(sent, [(p, q.t()) for p, q in zip(self.p.views, self.payload.views)])
        self.q.flat.copy_(self.payload.flat[:self.q.flat.numel()])
        if xbar is not None:
            self.record_contraction(xbar)

    def orthogonalize(self, p: torch.Tensor):
        """Gram-Schmidt on the columns, in place."""
        self.mm.orthogonalize(p, self.cfg.orthogonalization_epsilon)

    def state_dict(self, copy: bool = True) -> dict:
        state = super().state_dict(copy)
        state["shared"] = {"q": self.q.state(copy)}
        return state

    def state_layout(self) -> dict:
        return {**super().state_layout(), "q": [(s.name, tuple(v.shape)) for s, v in zip(self.slots, self.q.views)]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.q.load(state["shared"]["q"])
