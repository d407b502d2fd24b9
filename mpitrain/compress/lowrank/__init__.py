"""Low-rank compressors whose projector is shared by every rank: GreedyLore and PowerSGD.

Because every rank projects with the same P, compression is linear and commutes with the sum:
sum_i P P^T x_i = P P^T sum_i x_i. So the payloads are summed with Allreduce, and the whole
trajectory depends on the ranks' residuals only through their sum.

Each matrix X (n x m) is handled in its oriented form Xt (d x D, d = min(n, m)): X itself when
n <= m, X^T otherwise, so the basis is always d x d and the payload r x D. Each round is ONE
contiguous Allreduce over every matrix; the tensors that are not compressed and the layout's
control words ride in the fp32 round (with Q, or with greedylore's sketch when Q is 16-bit).

Rooms: `products` (the products, in torch operations and in compiled loops), `base` (what both
share), `powersgd`, and greedylore
composed of a `basis`, a `selector` and a factor `codec`.
"""
from .base import LowRank
from .basis import FixedBasis, TrackingBasis, noise_peak
from .greedylore import GreedyLore, GreedyLorePaper
from .powersgd import PowerSGD
from .products import Products, TorchProducts

__all__ = ["FixedBasis", "GreedyLore", "GreedyLorePaper", "LowRank", "PowerSGD", "Products", "TorchProducts",
           "TrackingBasis",
           "noise_peak"]
