"""What the low-rank compressors share: which matrices, the error feedback, the payload rounds."""
from __future__ import annotations

import re

import torch

from ...layout import all_finite
from ..base import Buckets, Compressor
from ..buffer import Buffer
from ..feedback import ErrorFeedback
from . import contraction
from .products import Products, TorchProducts


class LowRank(Compressor):
    """Compressed matrices travel as factors summed in one contiguous Allreduce a round; every
    other tensor (and the layout's control words) rides in one of those rounds, uncompressed.

    The first round can start in backward (--bucket-mb): each bucket's share of it is computed and
    its Allreduce started as backward finishes the bucket (a bucket's compressed matrices are
    consecutive in `slots`). `dense_first`: the uncompressed tensors ride in the first round
    rather than in the payload's (set when the payload round carries integers)."""

    dense_first = False
    on_device = True

    def __init__(self, layout, world, cfg):
        super().__init__(layout, world, cfg)
        skip = re.compile(cfg.uncompressed) if cfg.uncompressed else None
        self.slots = [s for s in layout.matrices if self.eligible(s) and not (skip and skip.search(s.name))]
        self.mm = Products() if self.compiled else TorchProducts(layout.device)
        if self.compiled:
            self.mm.preload()
        self.sent_q = None  # see own_q
        self.grads = [layout.matrix(layout.grads, s) for s in self.slots]  # views, made once
        self.r = [min(cfg.rank, s.n, s.m) for s in self.slots]
        self.d = [min(s.n, s.m) for s in self.slots]
        self.D = [max(s.n, s.m) for s in self.slots]
        self.feedback = ErrorFeedback([(s.n, s.m) for s in self.slots], self.error_feedback, layout.device)
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
        self.buckets = Buckets(layout, world, int(cfg.bucket_mb * 2**20), self.start_bucket)
        self.position = {s.index: i for i, s in enumerate(self.slots)}
        self.next_step = None  # known once a step was aggregated: only then can backward start one

    @property
    def compiled(self) -> bool:
        return self.cfg.kernels == "compiled" or (self.cfg.kernels == "auto" and self.layout.device.type == "cpu")

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
        self.allreduce_with_dense(buf) if self.dense_first else self.wire.allreduce_(buf.flat)

    def first_round_tail(self) -> list:
        """Collectives that end an overlapped first round, after every bucket's: the uncompressed
        tensors, when they ride in it."""
        if not self.dense_first:
            return []
        buf = self.first_round()
        self.pack_dense(buf.tail)
        return self.world.start_allreduce_(buf.np[buf.offsets[-1]:])

    def first_round_done(self) -> None:
        """After an overlapped first round and its tail."""
        if self.dense_first:
            self.unpack_dense(self.first_round().tail)

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
        return self.grads[i]

    def oriented(self, x: torch.Tensor) -> torch.Tensor:
        """d x D view of an n x m matrix (a transpose, never a copy)."""
        return x if x.shape[0] <= x.shape[1] else x.t()

    @staticmethod
    def factors(x: torch.Tensor, p: torch.Tensor, q: torch.Tensor):
        """(left, right) with left @ right = the n x m matrix whose oriented form is P Q."""
        return (p, q) if x.shape[0] <= x.shape[1] else (q.t(), p.t())

    # -- rounds -----------------------------------------------------------------------------
    def dense_round(self):
        self.wire.allreduce_(self.layout.flat)

    def add_residuals(self):
        for i in range(len(self.slots)):
            self.feedback.add_to(i, self.grad(i))

    def allreduce_with_dense(self, buf: Buffer):
        """buf summed, the uncompressed tensors riding in its tail."""
        self.pack_dense(buf.tail)
        self.wire.allreduce_(buf.flat)
        self.unpack_dense(buf.tail)

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
            self.sent_q = Buffer([tuple(v.shape) for v in self.payload.views], device=self.layout.device)
        own = self.sent_q.carve([tuple(v.shape) for v in payload.views])
        own.flat.copy_(payload.flat[:own.flat.numel()])
        return own

    def residuals_and_sums(self, sent: list, summed: list):
        """For each matrix: e = x - sent[i][0] @ sent[i][1], what this rank's own share of the
        reconstruction leaves out (with error feedback), then x = summed[i][0] @ summed[i][1], in
        one pass over the matrix."""
        self.mm.residuals_and_sums([(self.grad(i), self.feedback.kept(i), a, b)
                                    for i, (a, b) in enumerate(zip(sent, summed))])

    # -- measurement (--contraction-every) ----------------------------------------------------
    def measure(self, step: int) -> Buffer | None:
        """x-bar of every compressed matrix on the steps that measure the contraction, else None."""
        return contraction.global_inputs(self) if contraction.measuring(self.cfg, step) else None

    def record_contraction(self, xbar: Buffer):
        self.last_ratios = contraction.record(self, xbar)

    def base_stats(self, compressed: bool):
        self.stats = {"compressed_matrices": len(self.slots) if compressed else 0}

    def state_dict(self, copy: bool = True) -> dict:
        return {"local": self.feedback.state_dict(copy), "shared": {}}  # host arrays

    def state_layout(self) -> dict:
        return {"residual": [(s.name, tuple(s.shape)) for s in self.slots]}

    def load_state_dict(self, state: dict) -> None:
        self.feedback.load(state["local"].get("residual"))  # absent after --ef-resume reset
