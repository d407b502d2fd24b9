"""The MPI world: the only module that imports mpi4py.

Every collective runs on a contiguous numpy array with mpi4py's uppercase, buffer-based calls.
Owners of torch buffers keep a numpy view made once (`tensor.numpy()` shares memory): converting
per call costs more than the conversion itself, about 30 us per Allreduce measured here. Each collective adds to `sent_bytes` the bytes this rank
hands to it (its input buffer: the whole buffer for Allreduce, its own payload for Allgatherv, the
root's buffer for Bcast, each rank's part for Gather). Metrics read these counters; nothing else
in the project computes wire bytes from a formula.
"""
from __future__ import annotations

import sys
import os

import numpy as np

from mpi4py import MPI


_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}


class World:
    """Rank, size, node-local rank/size and counted collectives over MPI.COMM_WORLD."""

    def __init__(self):
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = node.Get_rank()
        self.local_size = node.Get_size()
        node.Free()
        self.sent_bytes = 0

    # -- counters -------------------------------------------------------------------------
    def take_sent_bytes(self) -> int:
        """Bytes sent since the last call (and reset the counter)."""
        n, self.sent_bytes = self.sent_bytes, 0
        return n

    # -- collectives ----------------------------------------------------------------------
    def allreduce_(self, arr: np.ndarray, op: str = "sum") -> np.ndarray:
        """In-place Allreduce of a contiguous array; returns it."""
        self.sent_bytes += arr.nbytes
        self._comm.Allreduce(MPI.IN_PLACE, arr, op=_OPS[op])
        return arr

    def bcast_(self, arr: np.ndarray, root: int = 0) -> np.ndarray:
        """In-place broadcast from `root`; returns the array."""
        if self.rank == root:
            self.sent_bytes += arr.nbytes
        self._comm.Bcast(arr, root=root)
        return arr

    def allgatherv(self, payload: np.ndarray) -> list[np.ndarray]:
        """Every rank's uint8 payload (sizes may differ), in rank order: one size exchange, one Allgatherv."""
        mine = np.ascontiguousarray(payload, dtype=np.uint8).reshape(-1)
        counts = np.zeros(self.size, dtype=np.int64)
        counts[self.rank] = mine.size
        self.allreduce_(counts)
        displs = np.zeros(self.size, dtype=np.int64)
        np.cumsum(counts[:-1], out=displs[1:])
        recv = np.empty(int(counts.sum()), dtype=np.uint8)
        self.sent_bytes += mine.nbytes
        self._comm.Allgatherv(mine, [recv, counts, displs, MPI.BYTE])
        return [recv[d:d + c] for d, c in zip(displs, counts)]

    def gather(self, arr: np.ndarray, root: int = 0) -> np.ndarray | None:
        """Stack every rank's equal-shaped array on `root` (None elsewhere)."""
        arr = np.ascontiguousarray(arr)
        out = np.empty((self.size,) + arr.shape, dtype=arr.dtype) if self.rank == root else None
        self.sent_bytes += arr.nbytes
        self._comm.Gather(arr, out, root=root)
        return out

    def first_rank_where(self, flag: bool) -> int | None:
        """The lowest rank whose `flag` is true, or None when it is false everywhere (a collective)."""
        v = np.array([self.rank if flag else self.size], dtype=np.int64)
        self.allreduce_(v, op="min")
        return None if v[0] == self.size else int(v[0])

    def barrier(self):
        self._comm.Barrier()

    def abort(self, code: int = 1):
        """End every rank of the job now (the only safe exit when one rank fails alone)."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.size == 1:
            os._exit(code)
        self._comm.Abort(code)

    # -- for benchmarks only: the bare library call, uncounted -----------------------------
    def raw_allreduce_(self, arr: np.ndarray):
        self._comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)

    @staticmethod
    def library_version() -> str:
        return MPI.Get_library_version().strip().splitlines()[0]

    @staticmethod
    def wtime() -> float:
        return MPI.Wtime()
