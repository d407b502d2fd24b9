"""Low-rank compressors whose projector is shared by every rank: GreedyLore and PowerSGD.

Because every rank projects with the same P, compression is linear and commutes with the sum:
sum_i P P^T x_i = P P^T sum_i x_i. So the payloads are summed with Allreduce, and the whole
trajectory depends on the ranks' residuals only through their sum.

Each matrix X (n x m) is handled in its oriented form Xt (d x D, d = min(n, m)): X itself when
n <= m, X^T otherwise, so the basis is always d x d and the payload r x D. Each round is ONE
contiguous Allreduce over every matrix; the tensors that are not compressed and the layout's
control words ride in the fp32 round (with Q, or with greedylore's sketch when Q is 16-bit).
"""
from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from statistics import NormalDist

import numpy as np
import torch

from ..layout import all_finite
from .base import Buckets, Compressor, kernels, register
from .streams import Purpose, torch_stream

_NOTHING = np.zeros((0, 0), dtype=np.float32)  # no residual kept, no factors for it
_NOTHING_T = torch.from_numpy(_NOTHING)
_POOLS: dict[int, ThreadPoolExecutor] = {}


def noise_peak(k: int, n: int) -> float:
    """The largest of n independent chi-squared(k)/k draws, as its 1 - 1/n quantile (Wilson-Hilferty).

    A probe estimate of one direction's energy is that energy times chi-squared(k)/k; the largest of
    n such estimates is inflated by about this factor even when all n energies are equal."""
    if n <= 1:
        return 1.0
    z = NormalDist().inv_cdf(1 - 1 / n)
    a = 2 / (9 * k)
    return max(1.0, (1 - a + z * math.sqrt(a)) ** 3)


class Buffer:
    """One contiguous fp32 buffer and named 2-D views into it, allocated once.

    `carve(shapes)` lays smaller shapes out from the start of the same memory, for rounds whose
    sizes change from step to step (every rank carves the same shapes, so the prefix they
    Allreduce is the same length)."""

    def __init__(self, shapes: list[tuple[int, int]], extra: int = 0, flat: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32):
        sizes = [a * b for a, b in shapes]
        self.flat = torch.zeros(sum(sizes) + extra, dtype=dtype) if flat is None else flat[:sum(sizes) + extra]
        self.np = self.flat.numpy()
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.views = [self.flat[o:o + a * b].view(a, b) for o, (a, b) in zip(self.offsets, shapes)]
        self.tail = self.flat[self.offsets[-1]:]
        self.carved: dict = {}

    def carve(self, shapes: list[tuple[int, int]], extra: int = 0) -> "Buffer":
        key = (tuple(shapes), extra)  # the same every step unless ranks move (global allocation)
        if key not in self.carved:
            if len(self.carved) >= 8:
                self.carved.clear()
            self.carved[key] = Buffer(shapes, extra, flat=self.flat)
        return self.carved[key]


class Products:
    """Products of one large matrix with skinny factors, and the residual-and-reconstruction pass,
    at about memory speed on the CPU: scratch buffers kept between steps, compiled loops run on
    this rank's torch threads."""

    def __init__(self):
        self._scratch: dict[str, torch.Tensor] = {}
        self._weights = np.zeros(0, dtype=np.uint64)  # the bases' checksum's, grown to the widest basis

    def scratch(self, purpose: str, shape) -> torch.Tensor:
        """A buffer for `purpose` that grows to the largest shape asked for once, then stays."""
        n = math.prod(shape)
        if purpose not in self._scratch or self._scratch[purpose].numel() < n:
            self._scratch[purpose] = torch.empty(n)
        return self._scratch[purpose][:n].view(*shape)

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
        for n, call, align in jobs:
            size = -(-max(n, 1) // max(1, min(threads, n // 64)))
            size = -(-size // align) * align
            plans.append((call, [(lo, min(n, lo + size)) for lo in range(0, n, size)]))
        width = max([len(ranges) for _, ranges in plans], default=0)
        done = self.map(lambda t: [call(t, *ranges[t]) if t < len(ranges) else None for call, ranges in plans],
                        list(range(width)))
        return [[done[t][j] for t in range(len(ranges))] for j, (_, ranges) in enumerate(plans)]

    def product(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, plus: torch.Tensor | None = None) -> None:
        """out = a @ b (see `products`)."""
        self.products([(a, b, out, plus)])

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
            args = (x.numpy(), _NOTHING if plus is None else plus.numpy(),
                    self.contiguous(f"right factor {j}", s.t()).numpy(), out.numpy())
            calls.append((x.shape[0], lambda t, lo, hi, a=args: kernels().right_product(*a, lo, hi), 4))
        self.in_chunks(calls)

    def left_products(self, jobs: list[tuple]) -> None:
        """out = s @ x for each job (s, x, out, plus), x contiguous (x += plus first, if given): each
        thread sums its share of x's rows into its own part, then the parts are added in order."""
        threads, at = torch.get_num_threads(), 0
        parts = self.scratch("parts", (sum(threads * out.numel() for _, _, out, _ in jobs),))
        calls, outs = [], []
        for j, (s, x, out, plus) in enumerate(jobs):
            mine = parts[at:at + threads * out.numel()].view(threads, *out.shape)
            at += mine.numel()
            args = (self.contiguous(f"factor {j}", s).numpy(), x.numpy(), _NOTHING if plus is None else plus.numpy(),
                    mine.numpy())
            calls.append((x.shape[0], lambda t, lo, hi, a=args: kernels().left_product(*a[:3], a[3][t], lo, hi), 1))
            outs.append((mine, out))
        for (mine, out), used in zip(outs, map(len, self.in_chunks(calls))):
            target = out if out.is_contiguous() else self.scratch("product", tuple(out.shape))
            torch.sum(mine[:used], 0, out=target) if used > 1 else target.copy_(mine[0])
            if target.data_ptr() != out.data_ptr():
                out.copy_(target)

    def residuals_and_sums(self, jobs: list[tuple]) -> None:
        """For each job (x, e, sent, summed): e = x - sent[0] @ sent[1] (unless e is None), then
        x = summed[0] @ summed[1]: one pass over x (n x m, contiguous) and e, its rows split among
        threads, every job's in one dispatch."""
        calls = []
        for j, (x, e, sent, summed) in enumerate(jobs):
            factors = [self.contiguous(f"factor {j}.{k}", f).numpy()
                       for k, f in enumerate((*((_NOTHING_T, _NOTHING_T) if e is None else sent), *summed))]
            args = (x.numpy(), _NOTHING if e is None else e.numpy(), *factors)
            calls.append((x.shape[0], lambda t, lo, hi, a=args: kernels().residual_and_sum(*a, lo, hi), 1))
        self.in_chunks(calls)

    def rotate_and_check(self, jobs: list[tuple]) -> tuple[list[np.ndarray], int]:
        """For each job (basis, tri, vt, u, yt, first): basis -= basis @ vt^T @ tri @ vt (the product
        of t reflectors in compact form, V = vt^T) and its first t columns set to u (t = u's
        columns, 0: no rotation); then (yt @ basis for each, the checksum of the bases' bits, rows
        numbered from each job's `first`): one pass over each basis (d x d), its rows split among
        threads, every job's in one dispatch; B V is made row by row in the same pass (a pass and a
        dispatch of its own before). The products are summed over fixed blocks of rows in their
        order: the same bits at any thread count."""
        k, calls, at = kernels(), [], 0
        blocks = [(-(-basis.shape[0] // k.BASIS_BLOCK), yt.shape[0], basis.shape[0]) for basis, *_, yt, _ in jobs]
        parts = self.scratch("basis parts", (sum(math.prod(b) for b in blocks),)).numpy()
        sums = self.scratch("basis products", (sum(math.prod(b[1:]) for b in blocks),)).numpy()
        views, summed_at = [], 0
        for j, ((basis, *small, first), shape) in enumerate(zip(jobs, blocks)):
            views.append((parts[at:at + math.prod(shape)].reshape(shape),
                          sums[summed_at:summed_at + math.prod(shape[1:])].reshape(shape[1:])))
            at, summed_at = at + math.prod(shape), summed_at + math.prod(shape[1:])
            b, (tri, vt, u, yt) = basis.numpy(), (self.contiguous(f"basis {j}.{i}", a).numpy() for i, a in enumerate(small))
            bv, w = (self.scratch(f"{purpose} {j}", (b.shape[0], u.shape[1])).numpy() for purpose in ("B V", "w"))
            args = (b, b.view(np.uint32), tri, vt, bv, w, u, yt, views[-1][0], self.weights(b.shape[1]), first)
            calls.append((b.shape[0], lambda _, lo, hi, a=args: k.rotate_rows(*a, lo, hi), k.BASIS_BLOCK))
        checks = self.in_chunks(calls)
        return ([np.sum(part, axis=0, out=total) for part, total in views],
                sum(int(c) for job in checks for c in job) % 2**64)

    def weights(self, n: int) -> np.ndarray:
        if self._weights.shape[0] < n:
            self._weights = np.empty(n, dtype=np.uint64)
            kernels().position_weights(self._weights)
        return self._weights[:n]

    def contiguous(self, purpose: str, a: torch.Tensor) -> torch.Tensor:
        """a itself if it is contiguous, else its copy in a scratch buffer (copied by numpy: a few
        hundred small copies a step, at a quarter of torch's per-call cost)."""
        if a.is_contiguous():
            return a
        copy = self.scratch(purpose, tuple(a.shape))
        np.copyto(copy.numpy(), a.numpy())
        return copy


class LowRank(Compressor):
    """What the low-rank compressors share: which matrices, residuals, the payload round."""

    def __init__(self, layout, world, cfg):
        super().__init__(layout, world, cfg)
        skip = re.compile(cfg.uncompressed) if cfg.uncompressed else None
        self.slots = [s for s in layout.matrices if self.eligible(s) and not (skip and skip.search(s.name))]
        self.mm = Products()
        self.sent_q = None  # see own_q
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
        # --bucket-mb: each bucket's share of the first round is computed and its Allreduce started
        # as backward finishes the bucket (a bucket's compressed matrices are consecutive in slots)
        self.buckets = Buckets(layout, world, int(cfg.bucket_mb * 2**20), self.start_bucket)
        self.position = {s.index: i for i, s in enumerate(self.slots)}
        self.next_step = None  # known once a step was aggregated: only then can backward start one

    def eligible(self, slot) -> bool:
        raise NotImplementedError

    # -- the first round, overlapped with backward --------------------------------------------
    @property
    def overlaps(self) -> bool:
        return len(self.buckets) > 0 and bool(self.slots)

    def first_round_overlaps(self, step: int) -> bool:
        """Whether step `step` is an ordinary compressed step whose first round can start in backward."""
        return False

    def first_round(self) -> Buffer:
        """The buffer the first round sums: one view per compressed matrix, then any tail."""
        raise NotImplementedError

    def first_round_matrices(self, which, step: int, add_residual: bool = True) -> None:
        """The shares of the first round of matrices `which` into `first_round()`, their residuals
        added first (unless they were already); the products in one dispatch."""
        self.mm.products([self.first_round_product(i, step, add_residual) for i in which])

    def first_round_product(self, i: int, step: int, add_residual: bool) -> tuple:
        """Matrix i's share of the first round, as a job (a, b, out, plus) of `Products.products`."""
        raise NotImplementedError

    def exchange_first_round(self, buf: Buffer) -> None:
        self.world.allreduce_(buf.np)

    def first_round_tail(self) -> list:
        """Collectives that end an overlapped first round, after every bucket's."""
        return []

    def first_round_done(self) -> None:
        """After an overlapped first round and its tail."""

    def begin(self):
        if self.next_step is not None and self.first_round_overlaps(self.next_step):
            self.buckets.begin(self.next_step)

    def start_bucket(self, bucket) -> list:
        mine = sorted(self.position[s.index] for s in bucket[2] if s.index in self.position)
        self.first_round_matrices(mine, self.buckets.step)
        if not mine:
            return []
        buf = self.first_round()
        return self.world.start_allreduce_(buf.np[buf.offsets[mine[0]]:buf.offsets[mine[-1] + 1]])

    def run_first_round(self, step: int) -> None:
        """The first round summed on every rank: the one backward's buckets started, or all of it now.
        A rank whose compressed matrices were not finite had sent them already; then, as an
        exchange after backward would have had it, its share becomes zero (its residual alone), the
        non-finite flag is raised and the round runs again: the same bits as without overlap."""
        add_residuals = True
        if self.buckets.in_flight:
            self.buckets.finish(self.first_round_tail, step)
            if all_finite(self.first_round().flat):
                return self.first_round_done()
            add_residuals = self.zero_share_if_nonfinite()  # else this rank's residuals are in already
        self.first_round_matrices(range(len(self.slots)), step, add_residuals)
        self.exchange_first_round(self.first_round())

    def zero_share_if_nonfinite(self) -> bool:
        """Zero this rank's share and raise the non-finite flag if a compressed matrix is not finite."""
        if all(all_finite(self.grad(i)) for i in range(len(self.slots))):
            return False
        self.layout.flat[:self.layout.numel].zero_()
        self.layout.control.drop_share()
        return True

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

    def add_residual(self, i: int):
        if self.error_feedback:
            self.grad(i).add_(self.residual.views[i])

    def add_residuals(self):
        for i in range(len(self.slots)):
            self.add_residual(i)

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

    def own_q(self, payload: Buffer) -> Buffer | None:
        """This rank's Q as it is sent (rounded, if 16-bit), copied once from the payload before the
        sum overwrites it: what the residual subtracts. None without error feedback."""
        if not self.error_feedback:
            return None
        if self.sent_q is None:  # as large as the payload's factors can be
            self.sent_q = Buffer([tuple(v.shape) for v in self.payload.views])
        own = self.sent_q.carve([tuple(v.shape) for v in payload.views])
        own.flat.copy_(payload.flat[:own.flat.numel()])
        return own

    def residuals_and_sums(self, sent: list, summed: list):
        """For each matrix: e = x - sent[i][0] @ sent[i][1], what this rank's own share of the
        reconstruction leaves out (with error feedback), then x = summed[i][0] @ summed[i][1], in
        one pass over the matrix."""
        self.mm.residuals_and_sums([(self.grad(i), self.residual.views[i] if self.error_feedback else None, a, b)
                                    for i, (a, b) in enumerate(zip(sent, summed))])

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
        self.stats["measuring_bytes"] = xbar.np.nbytes  # counted in wire bytes; not part of the method
        return xbar

    def record_contraction(self, xbar: Buffer):
        """contraction = ||x-bar - C(x-bar)||^2 / ||x-bar||^2 over the compressed matrices;
        captured = 1 - contraction; captured_optimal = the share the best rank-r approximation of
        each matrix (r = --rank) would hold: what an exact truncated SVD of x-bar would send."""
        num = [float((xbar.views[i] - self.grad(i)).square().sum()) for i in range(len(self.slots))]
        den = [float(v.square().sum()) for v in xbar.views]
        best = [float(torch.linalg.svdvals(v)[:r].square().sum()) for v, r in zip(xbar.views, self.r)]
        self.last_ratios = [a / b if b > 0 else 0.0 for a, b in zip(num, den)]
        total = sum(den)
        self.stats["contraction"] = sum(num) / total if total > 0 else 0.0
        self.stats["captured"] = 1 - self.stats["contraction"]
        self.stats["captured_optimal"] = sum(best) / total if total > 0 else 0.0
        self.stats["energy_share"] = [d / total if total > 0 else 0.0 for d in den]
        self.stats["captured_per_matrix"] = [1 - r for r in self.last_ratios]

    def base_stats(self, compressed: bool):
        self.stats = {"compressed_matrices": len(self.slots) if compressed else 0}

    def state_dict(self, copy: bool = True) -> dict:
        return {"local": {"residual": self.residual.np.copy() if copy else self.residual.np}, "shared": {}}

    def load_state_dict(self, state: dict) -> None:
        residual = state["local"].get("residual")  # absent after ef_resume=reset: start from zero
        self.residual.np[...] = 0.0 if residual is None else residual


@register
class GreedyLore(LowRank):
    """Greedy low-rank compression with error feedback over a complete orthonormal basis.

    Per compressed matrix the ranks share a complete d x d orthonormal basis B. Every step each
    direction's energy in the global x-bar = sum_i (g_i + e_i) is estimated, the directions are
    chosen greedily by energy, and Q = P^T x travels in one Allreduce. Because B is complete,
    choosing by energy keeps at least the chosen share of it: the compressor contracts at every
    step (delta = r/d per matrix; see `contraction_bound` for global allocation).

    `basis`:
      fixed     the paper's semi-lazy basis: the singular vectors of the dense average at the last
                refresh; energies from shared Gaussian probes (d x k floats per matrix).
      tracking  the basis follows the gradient. One Allreduce carries the sketch x [W | Omega']
                (W: orth of last step's Q^T, a warm-started power step; Omega': shared probes with
                W projected out). B is rotated by t Householder reflectors (O(d^2 t)) so that its
                first t columns are the left singular vectors of x-bar W and the others stay an
                orthonormal completion. Energies are exact inside span(W); on its complement they
                are unbiased probe estimates, discounted by the peak noise alone reaches there.
    `allocation`:
      per-matrix  each matrix sends what fits in its own share of the budget;
      global      one greedy choice over all (matrix, direction) pairs by energy per byte.
    The budget (not greedylore-paper): --rank r buys what powersgd sends at rank r, probes first.
    `factor_bits` 16: Q travels as int16 on per-row scales every rank shares (see `quantize`).
    `refresh_residual`: what a dense refresh does with the error-feedback residual: flush it into
    the dense exchange (then zero it), keep it for the next compressed step, or drop it.
    """

    name = "greedylore"
    published = False  # True: --rank is the literal rank, as in the paper

    def eligible(self, slot) -> bool:
        return min(slot.n, slot.m) > self.cfg.min_compression_rate * self.cfg.rank

    def variant(self, cfg) -> tuple[str, str, str, int]:
        return cfg.basis, cfg.allocation, cfg.refresh_residual, cfg.factor_bits

    def __init__(self, layout, world, cfg):
        super().__init__(layout, world, cfg)
        self.basis, self.allocation, self.refresh_residual, self.factor_bits = self.variant(cfg)
        self.tracking = self.basis == "tracking"
        self.refresh_every = cfg.refresh_every if cfg.refresh_every >= 0 else 0 if self.tracking else 200
        k = cfg.probes
        # 16-bit Q needs a first (fp32) round to carry the dense tensors: greedy selection has one
        self.integer = self.factor_bits == 16 and cfg.select == "greedy"
        # each rank rounds its own Q: the trajectory depends on every residual, not on their sum only
        self.linear = not self.integer
        # bytes per direction: its row of Q (and, 16-bit, the row's scale), and when tracking its
        # fp32 column of next step's sketch
        self.cost = [(2 * D + 4 if self.integer else 4 * D) + (4 * d if self.tracking else 0)
                     for d, D in zip(self.d, self.D)]
        if self.published:
            self.budget = sum(r * c for r, c in zip(self.r, self.cost))
        else:  # --rank r buys what powersgd sends at rank r, probes and the bases' check paid
            spend = [4 * cfg.rank * (s.n + s.m) - 4 * d * k for s, d in zip(self.slots, self.d)]
            self.budget = max(sum(self.cost), sum(spend) - 16)  # first; >= 1 direction per matrix
            self.r = self.afford(spend)
        # a matrix never gets more directions than would save min_compression_rate over dense
        rate = max(cfg.min_compression_rate, 1.0)
        self.cap = [max(r, min(d, int(d * D / ((d + D) * rate)))) if self.allocation == "global" else r
                    for r, d, D in zip(self.r, self.d, self.D)]
        self.ranks = list(self.r)     # directions sent last step, per matrix (tracking: W's width)
        self.bases = Buffer([(d, d) for d in self.d])
        self.warm = Buffer([(c, D) for c, D in zip(self.cap, self.D)])   # rows: last step's Q
        self.p = Buffer([(d, c) for d, c in zip(self.d, self.cap)])
        self.payload = Buffer([(d if cfg.scores == "exact" else c, D) for c, d, D in zip(self.cap, self.d, self.D)],
                              extra=self.dense_numel)
        width = {"probe": k, "exact": None}[cfg.scores]
        self.right = Buffer([(D, c + k) for c, D in zip(self.cap, self.D)])  # [W | Omega'] per matrix
        self.scores = Buffer([(d, (c if self.tracking else 0) + (width or D)) for d, c, D in
                              zip(self.d, self.cap, self.D)], extra=self.dense_numel)
        self.levels = max(1, 32767 // world.size)  # per rank, so that the sum of all ranks fits int16
        self.ints = Buffer([(c, D) for c, D in zip(self.cap, self.D)], dtype=torch.int16)
        self.peaks, self.scales = torch.zeros(sum(self.cap)), torch.zeros(sum(self.cap))
        self.refreshed_at = -1
        self.basis_rebroadcasts = 0

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

    def is_refresh(self, step: int) -> bool:
        every, s0 = self.refresh_every, self.cfg.start_compress_step
        if self.tracking:  # the basis is first built on the last dense warm-up step, for free
            return bool(every) and (step - s0 + 1) % every == 0
        return (step - s0) % every == 0 if every else step == s0

    def aggregate(self, step: int) -> None:
        self.next_step = step + 1
        s0 = self.cfg.start_compress_step
        if not self.slots or step < s0 - (1 if self.tracking else 0):
            self.base_stats(False)
            return self.dense_round()
        if step < s0 or self.refreshed_at < 0 or self.is_refresh(step):
            return self.refresh(step)
        sketched = self.first_round_overlaps(step)  # the tracking sketch: its round may have started in backward
        if sketched:
            self.run_first_round(step)
        else:
            self.add_residuals()
        self.base_stats(True)
        self.stats["refresh"] = False
        xbar = self.global_inputs() if self.measuring(step) else None
        ranks, chosen = self.select(step, sketched)  # 16-bit factors: the dense tensors travelled in the first round
        dense_here = 0 if self.integer else self.dense_numel
        payload = self.payload.carve([(r, D) for r, D in zip(ranks, self.D)], dense_here)
        projectors = self.p.carve([(d, r) for d, r in zip(self.d, ranks)])
        for i, idx in enumerate(chosen):
            torch.index_select(self.bases.views[i], 1, idx, out=projectors.views[i])
        self.mm.products([(p.t(), self.oriented(self.grad(i)), q, None)
                          for i, (p, q) in enumerate(zip(projectors.views, payload.views))])
        ints = self.quantize(payload, sum(ranks)) if self.integer else None
        factors = [self.factors(self.grad(i), p, q) for i, (p, q) in enumerate(zip(projectors.views, payload.views))]
        own = self.own_q(payload)
        sent = [self.factors(self.grad(i), p, q) for i, (p, q) in enumerate(zip(projectors.views, own.views))] \
            if own else [None] * len(factors)
        if self.integer:
            self.world.allreduce_(ints.np)  # exact integer sums, identical on every rank
            self.dequantize(ints, payload)
        else:
            self.pack_dense(payload.tail)
            self.world.allreduce_(payload.np)  # every Q summed, and the dense tensors with them
            self.unpack_dense(payload.tail)
        self.residuals_and_sums(sent, factors)
        if self.tracking:
            for i, q in enumerate(payload.views):
                self.warm.views[i][:ranks[i]].copy_(q)
        self.ranks = ranks
        self.stats["ranks"] = list(ranks)
        if xbar is not None:
            self.record_contraction(xbar)
            self.stats["contraction_bound"] = self.contraction_bound()

    def quantize(self, payload: Buffer, rows: int) -> Buffer:
        """Each row of Q as 16-bit integers on a scale every rank shares (one small max-Allreduce of
        the rows' peaks); each rank keeps within +-floor(32767 / ranks), so the integer sum can
        neither overflow nor round. payload's rows become what this rank sends, so error feedback
        keeps the rounding error exactly."""
        peaks = self.peaks[:rows]
        at = 0
        for q in payload.views:
            torch.amax(q.abs(), dim=1, out=peaks[at:at + q.shape[0]])
            at += q.shape[0]
        self.world.allreduce_(peaks.numpy(), op="max")
        self.scales[:rows] = peaks / self.levels
        ints, at = self.ints.carve([tuple(q.shape) for q in payload.views]), 0
        for q, n in zip(payload.views, ints.views):
            scale = self.scales[at:at + q.shape[0], None]
            at += q.shape[0]
            n.copy_(torch.where(scale > 0, q / scale, 0.0).round_())
            torch.mul(n, scale, out=q)
        return ints

    def dequantize(self, ints: Buffer, payload: Buffer):
        at = 0
        for q, n in zip(payload.views, ints.views):
            torch.mul(n, self.scales[at:at + q.shape[0], None], out=q)
            at += q.shape[0]

    def contraction_bound(self) -> float:
        if self.allocation == "per-matrix":
            return max(1 - r / d for r, d in zip(self.r, self.d))
        # Density-greedy takes a prefix of the listed (matrix, direction) pairs sorted by energy per
        # float; that prefix spends >= budget - max cost at >= the list's mean density, and each
        # matrix's top `cap` directions hold >= cap/d of its energy.
        listed = sum(c * cost for c, cost in zip(self.cap, self.cost))
        share = min(c / d for c, d in zip(self.cap, self.d))
        return 1 - share * min(1.0, max(0, self.budget - max(self.cost)) / listed)

    def refresh(self, step: int):
        """A dense step: the bases become the singular vectors of the average; tracking starts
        from its top right singular directions (W = x-bar^T U_r)."""
        if self.refresh_residual == "flush":
            self.add_residuals()
        self.dense_round()
        if self.refresh_residual != "keep":
            self.residual.flat.zero_()
        for i in range(len(self.slots)):
            x = self.oriented(self.grad(i))
            u, s, vt = torch.linalg.svd(x, full_matrices=False)
            self.bases.views[i].copy_(u)
            if self.tracking:
                self.warm.views[i][:self.r[i]].copy_(vt[:self.r[i]] * s[:self.r[i], None])
        self.ranks = list(self.r)
        self.verify_bases()
        self.refreshed_at = step
        self.base_stats(False)
        self.stats["refresh"] = True
        self.stats["ranks"] = list(self.r)  # W's width for the next step

    def verify_bases(self, check: int | None = None) -> bool:
        """Every rank must project onto the same basis; if any differs, rank 0's wins (counted) and
        this says True. `check`: the bases' checksum (`Products.rotate_and_check`), computed here if
        not given. 63 of its 64 bits travel: any one changed value still changes those. (A CRC32
        would need a pass of its own over the bases.)"""
        if check is None:
            check = self.rotate_and_check([b[:, :0] for b in self.bases.views], [b[:0] for b in self.bases.views])[1]
        check &= 2**63 - 1
        both = np.array([check, -check], dtype=np.int64)
        self.world.allreduce_(both, op="max")
        if both[0] == -both[1]:
            return False
        self.world.bcast_(self.bases.np)
        self.basis_rebroadcasts += 1
        return True

    def select(self, step: int, sketched: bool = False) -> tuple[list[int], list[torch.Tensor]]:
        """How many directions each matrix sends, and which (the same on every rank); `sketched`:
        the tracking sketch's round has run already."""
        cfg = self.cfg
        if cfg.select == "lazy":
            return list(self.r), [torch.arange(r) for r in self.r]
        if cfg.select == "random":
            return list(self.r), [torch.randperm(d, generator=torch_stream(cfg.seed, step, s.index,
                                                                           Purpose.RANDOM_SELECT))[:r]
                                  for s, d, r in zip(self.slots, self.d, self.r)]
        energies = self.track(step, sketched) if self.tracking else self.probe(step)
        if self.allocation == "per-matrix":
            order = [torch.argsort(e, descending=True, stable=True) for e in energies]
            return list(self.r), [o[:r] for o, r in zip(order, self.r)]
        return self.allocate(energies)

    def exchange_first_round(self, sums: Buffer):
        """With 16-bit factors the dense tensors and control words ride in this fp32 round."""
        if self.integer:
            self.pack_dense(sums.tail)
        self.world.allreduce_(sums.np)
        if self.integer:
            self.unpack_dense(sums.tail)

    def probe(self, step: int) -> list[torch.Tensor]:
        """The paper's estimate: signed projections of the global x-bar on shared Gaussian probes."""
        cfg, k = self.cfg, self.cfg.probes
        scores = self.scores.carve([(d, k if cfg.scores == "probe" else D) for d, D in zip(self.d, self.D)],
                                   self.dense_numel if self.integer else 0)
        probes = self.right.carve([(D, k) for D in self.D])
        for i, s in enumerate(self.slots):
            x, basis, out = self.oriented(self.grad(i)), self.bases.views[i], scores.views[i]
            if cfg.scores == "exact":
                torch.matmul(basis.t(), x, out=out)
            else:  # O(d D k + d^2 k), never the O(d^2 D) full projection
                torch.randn(probes.views[i].shape, generator=torch_stream(cfg.seed, step, s.index, Purpose.PROBE),
                            out=probes.views[i])
                torch.matmul(basis.t(), x @ probes.views[i], out=out)
        self.exchange_first_round(scores)  # signed projections of the global x-bar
        return [v.square().mean(1) for v in scores.views]

    def first_round_overlaps(self, step: int) -> bool:
        return (self.tracking and self.cfg.select == "greedy" and self.cfg.scores == "probe" and bool(self.slots)
                and step >= self.cfg.start_compress_step and self.refreshed_at >= 0 and not self.is_refresh(step))

    def first_round(self) -> Buffer:
        """The sketches x [W | Omega'] (and, with 16-bit factors, the dense tensors after them)."""
        return self.scores.carve([(d, t + self.cfg.probes) for d, t in zip(self.d, self.ranks)],
                                 self.dense_numel if self.integer else 0)

    def first_round_product(self, i: int, step: int, add_residual: bool) -> tuple:
        """x [W | Omega']: W = orth of last step's Q^T, Omega' shared probes with W projected out."""
        t, k = self.ranks[i], self.cfg.probes
        right = self.right.carve([(t + k, D) for t, D in zip(self.ranks, self.D)]).views[i]  # rows: W^T, probes
        w, probes = right[:t], right[t:]
        stream = torch_stream(self.cfg.seed, step, self.slots[i].index, Purpose.PROBE)
        torch.randn(probes.shape, generator=stream, out=probes)
        if t:
            w.copy_(torch.linalg.qr(self.warm.views[i][:t].t()).Q.t())
            probes.sub_((probes @ w.t()) @ w)
        return (self.oriented(self.grad(i)), right.t(), self.first_round().views[i],
                self.oriented(self.residual.views[i]) if add_residual and self.error_feedback else None)

    def first_round_tail(self) -> list:
        if not self.integer:
            return []
        sketch = self.first_round()
        self.pack_dense(sketch.tail)
        return self.world.start_allreduce_(sketch.np[sketch.offsets[-1]:])

    def first_round_done(self):
        if self.integer:
            self.unpack_dense(self.first_round().tail)

    def track(self, step: int, sketched: bool = False) -> list[torch.Tensor]:
        """One Allreduce of the sketches x [W | Omega'] (unless `sketched`: it ran already); rotate
        each basis toward x-bar W; energies."""
        k = self.cfg.probes
        sketch = self.first_round()
        if not sketched:
            self.first_round_matrices(range(len(self.slots)), step, add_residual=False)  # added by `aggregate`
            self.exchange_first_round(sketch)  # x-bar [W | Omega'] for every matrix
        us = [torch.linalg.svd(y[:, :t], full_matrices=False).U if t else y[:, :0]
              for y, t in zip(sketch.views, self.ranks)]
        yts = [y.t() for y in sketch.views]
        products, check = self.rotate_and_check(us, yts)  # (B^T y)^T for each rotated basis B
        if self.verify_bases(check):  # before any choice is made from them: rank 0's replaced ours
            products = self.rotate_and_check([y[:, :0] for y in sketch.views], yts)[0]
        energies = []
        for e, t in zip(map(torch.from_numpy, products), self.ranks):
            energy = e[:t].square().sum(0)
            # exact inside span(W); on its complement a probe estimate, discounted by the peak that
            # noise alone reaches among the complement's directions (measured: undiscounted noisy
            # picks displaced tracked directions and cost 0.04 bpc on the LM)
            energies.append(energy.add_(e[t:].square().mean(0) / noise_peak(k, len(energy) - t)))
        if self.cfg.scores == "exact":  # diagnostics: the true energies over the rotated bases (d x D each)
            exact = self.payload.carve([(d, D) for d, D in zip(self.d, self.D)])
            for i, out in enumerate(exact.views):
                torch.matmul(self.bases.views[i].t(), self.oriented(self.grad(i)), out=out)
            self.world.allreduce_(exact.np)
            energies = [v.square().sum(1) for v in exact.views]
        return energies

    def rotate_and_check(self, us: list, yts: list) -> tuple[list[np.ndarray], int]:
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
        utbs = [self.mm.scratch(f"u^T B {i}", (u.shape[1], d)) for i, (u, d) in enumerate(zip(us, self.d))]
        self.mm.products([(u.t(), basis, utb, None) for u, basis, utb in zip(us, self.bases.views, utbs) if u.shape[1]])
        reflectors = []
        for u, utb in zip(us, utbs):
            t = u.shape[1]
            if not t:
                reflectors.append((_NOTHING_T, u.t()))
                continue
            a, tau = torch.geqrf(utb.t())
            v = a.tril(-1)
            v.diagonal().fill_(1.0)
            gram, tau, tri = (v.t() @ v).numpy(), tau.numpy(), np.zeros((t, t), dtype=np.float32)
            for j in range(t):  # LAPACK's larft: the triangular factor T, column by column
                tri[j, j] = tau[j]
                tri[:j, j] = -tau[j] * (tri[:j, :j] @ gram[:j, j])
            reflectors.append((torch.from_numpy(tri), v.t()))
        return reflectors

    def allocate(self, energies: list[torch.Tensor]) -> tuple[list[int], list[torch.Tensor]]:
        """One greedy choice over every (matrix, direction) by energy per byte, within the budget."""
        order = [torch.argsort(e, descending=True, stable=True)[:c] for e, c in zip(energies, self.cap)]
        density = torch.cat([e[o] / c for e, o, c in zip(energies, order, self.cost)])
        owner = torch.cat([torch.full((len(o),), i) for i, o in enumerate(order)])
        cost = torch.tensor(self.cost, dtype=torch.float64)[owner]
        rank = torch.argsort(density, descending=True, stable=True)
        taken = owner[rank[torch.cumsum(cost[rank], 0) <= self.budget]]
        ranks = torch.bincount(taken, minlength=len(order)).tolist()
        return ranks, [o[:r] for o, r in zip(order, ranks)]

    def state_dict(self, copy: bool = True) -> dict:
        state = super().state_dict(copy)
        state["shared"] = {"bases": self.bases.np.copy() if copy else self.bases.np, "refreshed_at": self.refreshed_at,
                           "warm": self.warm.np.copy() if copy else self.warm.np,
                           "ranks": np.array(self.ranks, dtype=np.int64)}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        shared = state["shared"]
        self.bases.np[...] = shared["bases"]
        self.refreshed_at = int(shared["refreshed_at"])
        if "warm" in shared:
            self.warm.np[...] = shared["warm"]
            self.ranks = [int(r) for r in shared["ranks"]]


@register
class GreedyLorePaper(GreedyLore):
    """The published algorithm as first built here: fixed semi-lazy basis, r per matrix, the
    residual flushed into each refresh."""

    name = "greedylore-paper"
    published = True

    def variant(self, cfg) -> tuple[str, str, str, int]:
        return "fixed", "per-matrix", "flush", 32


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
        self.coefs = np.zeros(max(self.r, default=0), dtype=np.float32)  # Gram-Schmidt's scratch
        for s, q in zip(self.slots, self.q.views):
            q.copy_(torch.randn(q.shape, generator=torch_stream(cfg.seed, 0, s.index, Purpose.POWER_INIT)))

    def first_round_overlaps(self, step: int) -> bool:
        return step >= self.cfg.start_compress_step and self.cfg.warm_start

    def first_round(self) -> Buffer:
        return self.p

    def first_round_product(self, i: int, step: int, add_residual: bool) -> tuple:
        """P = X Q."""
        if not self.cfg.warm_start:
            s, q = self.slots[i], self.q.views[i]
            q.copy_(torch.randn(q.shape, generator=torch_stream(self.cfg.seed, step, s.index, Purpose.POWER_INIT)))
        return (self.grad(i), self.q.views[i], self.p.views[i],
                self.residual.views[i] if add_residual and self.error_feedback else None)

    def aggregate(self, step: int) -> None:
        self.next_step = step + 1
        if step < self.cfg.start_compress_step or not self.slots:
            self.base_stats(False)
            return self.dense_round()
        self.run_first_round(step)
        self.base_stats(True)
        xbar = self.global_inputs() if self.measuring(step) else None
        for p in self.p.views:
            self.orthogonalize(p)
        self.mm.products([(self.grad(i).t(), p, q, None) for i, (p, q) in enumerate(zip(self.p.views, self.payload.views))])
        own = self.own_q(self.payload)
        sent = [(p, q.t()) for p, q in zip(self.p.views, own.views)] if own else [None] * len(self.slots)
        self.pack_dense(self.payload.tail)
        self.world.allreduce_(self.payload.np)
        self.residuals_and_sums(sent, [(p, q.t()) for p, q in zip(self.p.views, self.payload.views)])
        self.q.np[...] = self.payload.np[:self.q.np.size]
        self.unpack_dense(self.payload.tail)
        if xbar is not None:
            self.record_contraction(xbar)

    def orthogonalize(self, p: torch.Tensor):
        """Gram-Schmidt on the columns, in place (`kernels.orthogonalize`)."""
        kernels().orthogonalize(p.numpy(), self.cfg.orthogonalization_epsilon, self.coefs)

    def state_dict(self, copy: bool = True) -> dict:
        state = super().state_dict(copy)
        state["shared"] = {"q": self.q.np.copy() if copy else self.q.np}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.q.np[...] = state["shared"]["q"]
