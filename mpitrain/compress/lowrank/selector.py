"""Which directions of the basis each matrix sends, the same choice on every rank."""
from __future__ import annotations

import torch

from ..streams import Purpose, torch_stream


class Selector:
    """Chooses (directions per matrix, their columns of the basis) from the directions' energies.
    `r`: each matrix's share of the budget in directions; `cost`: bytes a direction costs."""

    needs_energies = True

    def __init__(self, r: list[int], d: list[int], cap: list[int], cost: list[int], budget: int, seed: int,
                 indices: list[int]):
        self.r, self.d, self.cap, self.cost, self.budget = r, d, cap, cost, budget
        self.seed, self.indices = seed, indices

    def choose(self, step: int, energies: list[torch.Tensor] | None) -> tuple[list[int], list[torch.Tensor]]:
        raise NotImplementedError

    def contraction_bound(self) -> float:
        """The largest share of x-bar's energy a step may leave out: r of d directions by energy."""
        return max(1 - r / d for r, d in zip(self.r, self.d))


class Lazy(Selector):
    """The top r singular vectors of the last refresh, as they were (GaLore-like; no contraction)."""

    needs_energies = False

    def choose(self, step, energies):
        return list(self.r), [torch.arange(r) for r in self.r]


class Random(Selector):
    """r directions of the full basis drawn from a stream every rank shares."""

    needs_energies = False

    def choose(self, step, energies):
        draws = [torch.randperm(d, generator=torch_stream(self.seed, step, index, Purpose.RANDOM_SELECT))[:r]
                 for index, d, r in zip(self.indices, self.d, self.r)]
        return list(self.r), draws


class PerMatrix(Selector):
    """Each matrix its r directions of most energy."""

    def choose(self, step, energies):
        order = [torch.argsort(e, descending=True, stable=True) for e in energies]
        return list(self.r), [o[:r] for o, r in zip(order, self.r)]


class Global(Selector):
    """One greedy choice over every (matrix, direction) by energy per byte, within the budget; a
    matrix takes at most `cap` directions."""

    def choose(self, step, energies):
        order = [torch.argsort(e, descending=True, stable=True)[:c] for e, c in zip(energies, self.cap)]
        density = torch.cat([e[o] / c for e, o, c in zip(energies, order, self.cost)])
        owner = torch.cat([torch.full((len(o),), i) for i, o in enumerate(order)])
        cost = torch.tensor(self.cost, dtype=torch.float64)[owner]
        rank = torch.argsort(density, descending=True, stable=True)
        taken = owner[rank[torch.cumsum(cost[rank], 0) <= self.budget]]
        ranks = torch.bincount(taken, minlength=len(order)).tolist()
        return ranks, [o[:r] for o, r in zip(order, ranks)]

    def contraction_bound(self) -> float:
        # Density-greedy takes a prefix of the listed (matrix, direction) pairs sorted by energy per
        # float; that prefix spends >= budget - max cost at >= the list's mean density, and each
        # matrix's top `cap` directions hold >= cap/d of its energy.
        listed = sum(c * cost for c, cost in zip(self.cap, self.cost))
        share = min(c / d for c, d in zip(self.cap, self.d))
        return 1 - share * min(1.0, max(0, self.budget - max(self.cost)) / listed)


def selector_class(select: str, allocation: str) -> type[Selector]:
    """--select greedy chooses by energy, per matrix or globally (--allocation)."""
    if select == "greedy":
        return {"per-matrix": PerMatrix, "global": Global}[allocation]
    return {"lazy": Lazy, "random": Random}[select]
