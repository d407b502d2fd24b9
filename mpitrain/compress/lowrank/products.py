"""The products the low-rank compressors are made of: in torch operations on any device (the
path a GPU runs, and on the CPU the check of the compiled one: --kernels torch), and in compiled
loops on the CPU (the default there)."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..base import kernels
from ..streams import mix64, seed_state

NOTHING = np.zeros((0, 0), dtype=np.float32)  # no residual kept, no factors for it
NOTHING_T = torch.from_numpy(NOTHING)
_POOLS: dict[int, ThreadPoolExecutor] = {}


def odd_weights(first: int, n: int) -> np.ndarray:
    """mix64(first + i) | 1 for i < n as uint64: the bases' checksum's weights (columns from 0, rows
    from each basis's offset), the same numbers the compiled pass computes."""
    return mix64(np.arange(first, first + n, dtype=np.uint64)) | np.uint64(1)


class TorchProducts:
    """The products, the residual-and-reconstruction pass, the basis pass and Gram-Schmidt in torch
    operations, on the device the tensors live on. The same algorithm as the compiled loops and
    the same bits on every rank of a run (each rank runs the same operations on the same inputs),
    not the compiled loops' bits: their sums take another order."""

    compiled = False  # whether the compiled loops are loaded (and so cheaper for small work too)

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._scratch: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, torch.Tensor] = {}
        self._checksum_weights: dict[tuple[int, int], torch.Tensor] = {}

    def scratch(self, purpose: str | tuple, shape) -> torch.Tensor:
        """A buffer for `purpose` that grows to the largest shape asked for once, then stays; its
        views kept too (a few dozen are asked for a step, mostly of the same shapes)."""
        key = (purpose, tuple(shape))
        view = self._views.get(key)
        if view is None:
            n, held = math.prod(shape), self._scratch.get(purpose)
            if held is None or held.numel() < n:
                held = self._scratch[purpose] = torch.empty(n, device=self.device)
                self._views = {k: v for k, v in self._views.items() if k[0] != purpose}
            if len(self._views) >= 512:  # shapes that move every step (global allocation)
                self._views.clear()
            view = self._views[key] = held[:n].view(*shape)
        return view

    def product(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, plus: torch.Tensor | None = None) -> None:
        """out = a @ b (see `products`)."""
        self.products([(a, b, out, plus)])

    def products(self, jobs: list[tuple]) -> None:
        """out = a @ b for each job (a, b, out, plus); `plus` (a's shape, or None) is added into a in
        place first."""
        for a, b, out, plus in jobs:
            if plus is not None:
                a.add_(plus)
            torch.mm(a, b, out=out)

    def residuals_and_sums(self, jobs: list[tuple]) -> None:
        """For each job (x, e, sent, summed): e = x - sent[0] @ sent[1] (unless e is None), then
        x = summed[0] @ summed[1]."""
        for x, e, sent, summed in jobs:
            if e is not None:
                torch.addmm(x, sent[0], sent[1], alpha=-1.0, out=e)
            torch.mm(summed[0], summed[1], out=x)

    def rotate_and_check(self, jobs: list[tuple]) -> tuple[list[torch.Tensor], int]:
        """For each job (basis, tri, vt, u, yt, first): basis -= basis @ vt^T @ tri @ vt and its first
        t columns set to u (t = u's columns, 0: no rotation); then (yt @ basis for each, the
        checksum of the bases' bits, rows numbered from each job's `first`)."""
        products, checks = [], []
        for basis, tri, vt, u, yt, first in jobs:
            t = u.shape[1]
            if t:
                basis.sub_(((basis @ vt.t()) @ tri) @ vt)
                basis[:, :t] = u
            products.append(yt @ basis)
            checks.append(self.checksum(basis, first))
        return products, int(torch.stack(checks).sum()) % 2**64 if checks else 0  # one wait for the device

    def checksum(self, basis: torch.Tensor, first: int) -> torch.Tensor:
        """sum over rows i of (mix64(first + i) | 1) * sum_j bits[i, j] * (mix64(j) | 1) mod 2^64, bits
        the basis's values as uint32: the compiled pass's checksum, as an int64 tensor on the basis's
        device. int64 arithmetic wraps as uint64's does, so the sums agree mod 2^64."""
        n, m = basis.shape
        bits = basis.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        rows = (bits * self.checksum_weights(0, m)).sum(1)
        return (rows * self.checksum_weights(first, n)).sum()

    def checksum_weights(self, first: int, n: int) -> torch.Tensor:
        key = (first, n)
        if key not in self._checksum_weights:
            weights = torch.from_numpy(odd_weights(first, n).view(np.int64)).to(self.device)
            self._checksum_weights[key] = weights
        return self._checksum_weights[key]

    def reflectors(self, a: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, V^T) from geqrf's (a, tau): V unit lower triangular, its tails a's strict lower part,
        and T (LAPACK's larft) with I - V T V^T the product of the reflectors."""
        v = a.tril(-1)
        v.diagonal().fill_(1.0)
        return self.triangular_factor(v, tau), v.t()

    def triangular_factor(self, v: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """LAPACK's larft: T with I - V T V^T the product of the reflectors (V's columns, tau)."""
        t, gram = tau.shape[0], v.t() @ v
        tri = torch.zeros((t, t), device=v.device)
        for j in range(t):
            tri[j, j] = tau[j]
            tri[:j, j] = -tau[j] * (tri[:j, :j] @ gram[:j, j])
        return tri

    def orthogonalize(self, p: torch.Tensor, eps: float) -> None:
        """Classical Gram-Schmidt on p's columns in place, each projection applied twice, then each
        column over (its norm + eps): the compiled loop's steps, its dot products and norms float64."""
        for j in range(p.shape[1]):
            column = p[:, j]
            for _ in range(2 if j else 0):
                coefs = (p[:, :j].double().t() @ column.double()).float()
                column.sub_(p[:, :j] @ coefs)
            column.div_((column.double().square().sum().sqrt() + eps).float())


class Products(TorchProducts):
    """Products of one large matrix with skinny factors, and the residual-and-reconstruction pass,
    at about memory speed on the CPU: scratch buffers kept between steps, compiled loops run on
    this rank's torch threads, every sum in a fixed order."""

    compiled = True

    def __init__(self):
        super().__init__("cpu")
        self._weights = np.zeros(0, dtype=np.uint64)  # the bases' checksum's, grown to the widest basis
        self._rotation_plans: dict[tuple, list] = {}
        self._coefs = np.zeros(0, dtype=np.float32)  # Gram-Schmidt's scratch

    def preload(self) -> None:
        """Every compiled loop these products call, loaded from numba's cache now, while the
        compressor is built, rather than in the first compressed steps, which the job's training
        time counts (docs/performance.md): each called once on an empty range of rows, with the
        dtypes and layouts of a step's calls (numba keys a loop by its arguments' types as it sees
        them; a C-ordered matrix, or a transposed one as `out`)."""
        k, m, none = kernels(), np.zeros((2, 2), dtype=np.float32), np.zeros(0, dtype=np.float32)
        for out in (m, m.T):  # out^T = X^T @ S^T makes out a transposed view
            k.right_product(m, m, m, out, 0, 0)
        k.left_product(m, m, m, m, 0, 0)
        k.residual_and_sum(m, m, m, m, m, m, 0, 0)
        k.rotate_rows(m, m.view(np.uint32), m, m, m, m, m, m, m[None], self.weights(2), 0, 0, 0)
        k.reflectors(m[:0], none, m[:0, :0])
        k.orthogonalize(m[:, :0], 0.0, none)
        seed_state(0)  # the shared probes' seeds

    @staticmethod
    def map(call, items: list) -> list:
        """[call(item) for item in items], run on this rank's torch threads (the compiled loops
        release the interpreter lock)."""
        threads = min(torch.get_num_threads(), len(items))
        if threads <= 1:
            return [call(item) for item in items]
        if threads not in _POOLS:  # one per thread count and process, however many compressors
            _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="mpitrain-lowrank")
        return list(_POOLS[threads].map(call, items))

    def in_chunks(self, jobs: list[tuple]) -> list[list]:
        """For each job (n, call, align): [call(t, lo, hi)] over ranges [lo, hi) that split range(n)
        among this rank's torch threads, each lo a multiple of align. Thread t runs its range of
        every job, in order, in one dispatch: a handoff to the threads costs more than a small
        matrix's work, and one per matrix added up on models of many matrices. Jobs must not touch
        each other's rows."""
        threads, plans = torch.get_num_threads(), []
        if threads == 1:  # as below, without the plans (ranks that outnumber the cores run this)
            return [[call(0, 0, n)] if n else [] for n, call, _ in jobs]
        for n, call, align in jobs:
            size = -(-max(n, 1) // max(1, min(threads, n // 64)))
            size = -(-size // align) * align
            plans.append((call, [(lo, min(n, lo + size)) for lo in range(0, n, size)]))
        width = max([len(ranges) for _, ranges in plans], default=0)
        done = self.map(lambda t: [call(t, *ranges[t]) if t < len(ranges) else None for call, ranges in plans],
                        list(range(width)))
        return [[done[t][j] for t in range(len(ranges))] for j, (_, ranges) in enumerate(plans)]

    def products(self, jobs: list[tuple]) -> None:
        """out = a @ b for each job (a, b, out, plus): one large matrix X and one skinny S, X read
        once by a compiled loop, its rows split among threads, the jobs of each form in one
        dispatch: X @ S with X contiguous, and S @ X with X contiguous (X^T @ S is (S^T @ X)^T).
        MKL ran these skinny shapes compute-bound, slower than the loop in every layout but one
        (docs/performance.md, `bench compress`), so one route is kept. `plus`
        (a's shape and layout, or None) is added into a in place first: where a is X, a block of
        rows at a time just before the block is multiplied."""
        lefts, rights = [], []
        for a, b, out, plus in jobs:
            if plus is not None and a.numel() < b.numel():
                a.add_(plus)
                plus = None
            if a.numel() < b.numel():  # out = S @ X, the same product as out^T = X^T @ S^T
                a, b, out = b.t(), a.t(), out.t()
            if a.is_contiguous():
                rights.append((a, b, out, plus))
            else:  # X^T @ S = (S^T @ X)^T
                lefts.append((b.t(), a.t(), out.t(), None if plus is None else plus.t()))
        self.right_products(rights)
        self.left_products(lefts)

    def right_products(self, jobs: list[tuple]) -> None:
        """out = x @ s for each job (x, s, out, plus), x contiguous (x += plus first, if given)."""
        calls = []
        for j, (x, s, out, plus) in enumerate(jobs):
            args = (x.numpy(), NOTHING if plus is None else plus.numpy(),
                    self.contiguous(("right factor", j), s.t()).numpy(), out.numpy())
            calls.append((x.shape[0], lambda t, lo, hi, a=args: kernels().right_product(*a, lo, hi), 4))
        self.in_chunks(calls)

    def left_products(self, jobs: list[tuple]) -> None:
        """out = s @ x for each job (s, x, out, plus), x contiguous (x += plus first, if given): each
        thread sums its share of x's rows into its own part, then the parts are added in order (one
        thread: its part is the product)."""
        threads, at, k = torch.get_num_threads(), 0, kernels()
        parts = self.scratch("parts", (sum(threads * out.numel() for _, _, out, _ in jobs),)) if threads > 1 else None
        calls, outs = [], []
        for j, (s, x, out, plus) in enumerate(jobs):
            target = out if out.is_contiguous() else self.scratch(("product", j), tuple(out.shape))
            if parts is None:
                mine = target.unsqueeze(0)
            else:
                mine = parts[at:at + threads * out.numel()].view(threads, *out.shape)
                at += mine.numel()
            args = (self.contiguous(("factor", j), s).numpy(), x.numpy(), NOTHING if plus is None else plus.numpy(),
                    mine.numpy())
            calls.append((x.shape[0], lambda t, lo, hi, a=args: k.left_product(*a[:3], a[3][t], lo, hi), 1))
            outs.append((mine, target, out))
        for (mine, target, out), used in zip(outs, map(len, self.in_chunks(calls))):
            if parts is not None:
                torch.sum(mine[:used], 0, out=target) if used > 1 else target.copy_(mine[0])
            if target is not out:
                out.copy_(target)

    def residuals_and_sums(self, jobs: list[tuple]) -> None:
        """For each job (x, e, sent, summed): e = x - sent[0] @ sent[1] (unless e is None), then
        x = summed[0] @ summed[1]: one pass over x (n x m, contiguous) and e, its rows split among
        threads, every job's in one dispatch."""
        calls = []
        for j, (x, e, sent, summed) in enumerate(jobs):
            factors = [self.contiguous(("factor", j, k), f).numpy()
                       for k, f in enumerate((*((NOTHING_T, NOTHING_T) if e is None else sent), *summed))]
            args = (x.numpy(), NOTHING if e is None else e.numpy(), *factors)
            calls.append((x.shape[0], lambda t, lo, hi, a=args: kernels().residual_and_sum(*a, lo, hi), 1))
        self.in_chunks(calls)

    def rotate_and_check(self, jobs: list[tuple]) -> tuple[list[torch.Tensor], int]:
        """For each job (basis, tri, vt, u, yt, first): basis -= basis @ vt^T @ tri @ vt (the product
        of t reflectors in compact form, V = vt^T) and its first t columns set to u (t = u's
        columns, 0: no rotation); then (yt @ basis for each, the checksum of the bases' bits, rows
        numbered from each job's `first`): one pass over each basis (d x d), its rows split among
        threads, every job's in one dispatch; B V is made row by row in the same pass (a pass and a
        dispatch of its own before). The products are summed over fixed blocks of rows in their
        order: the same bits at any thread count."""
        k, calls = kernels(), []
        key = tuple((basis.shape[0], u.shape[1], yt.shape[0]) for basis, _, _, u, yt, _ in jobs)
        plan = self._rotation_plans.get(key) or self.rotation_plan(key)
        for j, ((basis, tri, vt, u, yt, first), (parts, _, bv, w, weights, _)) in enumerate(zip(jobs, plan)):
            b = basis.numpy()
            args = (b, b.view(np.uint32), self.contiguous(("basis tri", j), tri).numpy(),
                    self.contiguous(("basis vt", j), vt).numpy(), bv, w, self.contiguous(("basis u", j), u).numpy(),
                    self.contiguous(("basis yt", j), yt).numpy(), parts, weights, first)
            calls.append((b.shape[0], lambda _, lo, hi, a=args: k.rotate_rows(*a, lo, hi), k.BASIS_BLOCK))
        checks = self.in_chunks(calls)
        for parts, total, *_ in plan:
            np.add.reduce(parts, axis=0, out=total)
        return [summed for *_, summed in plan], sum(int(c) for job in checks for c in job) % 2**64

    def rotation_plan(self, key: tuple) -> list[tuple]:
        """For each job of `rotate_and_check` with (d, t, rows of yt) in `key`: its blocks' products,
        their sum (as an array and as a tensor), B V's and w's scratch, the checksum's weights;
        kept per key, as ranks rarely move."""
        if len(self._rotation_plans) >= 64:
            self._rotation_plans.clear()
        plan = []
        for d, t, rows in key:
            parts = np.empty((-(-d // kernels().BASIS_BLOCK), rows, d), dtype=np.float32)
            total = np.empty((rows, d), dtype=np.float32)
            plan.append((parts, total, np.empty((d, t), dtype=np.float32), np.empty((d, t), dtype=np.float32),
                         self.weights(d), torch.from_numpy(total)))
        self._rotation_plans[key] = plan
        return plan

    def weights(self, n: int) -> np.ndarray:
        if self._weights.shape[0] < n:
            self._weights = np.empty(n, dtype=np.uint64)
            kernels().position_weights(self._weights)
        return self._weights[:n]

    def reflectors(self, a: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As `TorchProducts.reflectors`, in one compiled call on geqrf's own output (V^T is made in
        its memory): per matrix a fraction of the small torch and numpy operations' cost."""
        vt = a.t() if a.t().is_contiguous() else a.t().contiguous()
        tri = torch.empty((tau.shape[0], tau.shape[0]))
        kernels().reflectors(vt.numpy(), tau.numpy(), tri.numpy())
        return tri, vt

    def orthogonalize(self, p: torch.Tensor, eps: float) -> None:
        """Gram-Schmidt on p's columns in place (`kernels.orthogonalize`): one call a matrix."""
        if self._coefs.shape[0] < p.shape[1]:
            self._coefs = np.zeros(p.shape[1], dtype=np.float32)
        kernels().orthogonalize(p.numpy(), eps, self._coefs)

    def contiguous(self, purpose: str | tuple, a: torch.Tensor) -> torch.Tensor:
        """a itself if it is contiguous, else its copy in a scratch buffer (copied by numpy: a few
        hundred small copies a step, at a quarter of torch's per-call cost)."""
        if a.is_contiguous():
            return a
        copy = self.scratch(purpose, tuple(a.shape))
        np.copyto(copy.numpy(), a.numpy())
        return copy

