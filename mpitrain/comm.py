"""The MPI world: the only module that imports mpi4py.

Every collective runs on a contiguous numpy array with mpi4py's uppercase, buffer-based calls. Owners of
torch buffers keep a numpy view made once (`tensor.numpy()` shares memory): converting per call costs
more than a small Allreduce itself (`bench allreduce` compares with bare mpi4py). Each collective adds
to `sent_bytes` the bytes this rank hands to it (its input buffer: the whole buffer for Allreduce, its
own payload for Allgatherv, the root's buffer for Bcast, each rank's part for Gather). Metrics read
these counters; nothing else in the project computes wire bytes from a formula.

Stalls. With `stall_timeout` set, collectives are the nonblocking calls and this rank waits for them
with a deadline. A rank that has waited past it tells every other rank, on a separate communicator, that
it is present; a waiting rank that hears this answers the same way. After a short grace the lowest rank
present names the ranks it did not hear from (the stopped, wedged or still-busy ones) and ends the whole
job with exit code `STALLED`. A rank that never arrives cannot answer, which is the point.

Large messages. MPI counts are C ints; no single call here moves more than `max_message_bytes`
(a little under 2 GiB): bigger buffers go in pieces, and Allgatherv in rounds.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
import traceback
import zlib

import numpy as np


class NoMPI(ImportError):
    """mpi4py or the MPI library it loads is missing: one line that says how to get one."""


try:
    from mpi4py import MPI
except (ImportError, RuntimeError) as e:  # mpi4py's wheel loads libmpi at import: RuntimeError when there is none
    raise NoMPI(f"no MPI found ({str(e).splitlines()[0]}); install one with pip install 'mpitrain[mpich]' "
                "(or pip install mpich), or load your cluster's MPI (e.g. module load openmpi) and reinstall mpi4py "
                "against it: pip install --no-binary mpi4py --force-reinstall mpi4py") from None


_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
STALLED = 3  # exit code of a job ended by the stall watchdog
_STALL_TAG = 7
_LOOK_S = 0.05  # how often a waiting rank checks its deadline and listens for stall notices
NODE_ENV = "MPITRAIN_NODE"  # set by `mpitrain emulate`: the emulated node this rank is on


def pieces(arr: np.ndarray, max_bytes: int) -> list[np.ndarray]:
    """arr's values in order, in views of at most max_bytes (MPI counts are 32-bit)."""
    if not arr.flags.c_contiguous:  # reshape would copy, and the collective would fill the copy
        raise ValueError("a collective needs a C-contiguous array")
    flat = arr.reshape(-1)
    step = max(1, max_bytes // max(1, arr.itemsize))
    return [flat] if flat.size <= step else [flat[i:i + step] for i in range(0, flat.size, step)]


def _host_and_node(comm, rank: int) -> tuple:
    """(the ranks sharing this machine's cores, those of this rank's node, the node's name). An
    emulated cluster (`mpitrain emulate`) names each rank's node. Its nodes share this host's cores,
    and MPI, told not to use shared memory between them, sees each rank as a host of its own."""
    emulated, host = os.environ.get(NODE_ENV, ""), MPI.Get_processor_name()
    named = lambda name: comm.Split(zlib.crc32(name.encode()) & 0x7FFFFFFF, key=rank)  # noqa: E731
    on_host = named(host) if emulated else comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    return on_host, named(emulated) if emulated else on_host, emulated or host


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]


def _spec(counts: np.ndarray, parts: list[np.ndarray] | None = None) -> list:
    """A v-collective's [buffer, counts, displacements, BYTE]: the parts end to end, or room for them."""
    displs = np.zeros(counts.size, dtype=np.int64)
    np.cumsum(counts[:-1], out=displs[1:])
    buf = np.concatenate(parts) if parts else np.empty(int(counts.sum()), dtype=np.uint8)
    return [buf, counts, displs, MPI.BYTE]


def _in_rounds(recv_counts: np.ndarray, largest: int, c: int, one_round) -> list[np.ndarray]:
    """What a v-collective receives from each rank, in rounds that keep every count within an MPI
    int: one_round(k, receive_spec) moves bytes [k*c, (k+1)*c) of every rank's part. A single round
    leaves the parts where MPI put them."""
    rounds = max(1, -(-largest // c))
    got = None if rounds == 1 else [np.empty(int(n), dtype=np.uint8) for n in recv_counts]
    for k in range(rounds):
        recv = _spec(np.clip(recv_counts - k * c, 0, c))
        one_round(k, recv)
        parts = [recv[0][d:d + n] for d, n in zip(recv[2], recv[1])]
        if got is None:
            return parts
        for whole, part in zip(got, parts):
            whole[k * c:k * c + part.size] = part
    return got


class PayloadCollectives:
    """World's collectives on byte payloads whose sizes differ by rank: a size exchange, then the
    v-collective, in rounds when a part would pass max_message_bytes / size."""

    def allgatherv(self, payload: np.ndarray) -> list[np.ndarray]:
        """Every rank's uint8 payload, in rank order."""
        mine = np.ascontiguousarray(payload, dtype=np.uint8).reshape(-1)
        counts = np.zeros(self.size, dtype=np.int64)
        counts[self.rank] = mine.size
        self.allreduce_(counts)
        self.sent_bytes += mine.nbytes
        c = max(1, self.max_message_bytes // self.size)

        def one_round(k, recv):
            part = mine[k * c:(k + 1) * c]
            self._run("Allgatherv", lambda: self._comm.Iallgatherv(part, recv),
                      lambda: self._comm.Allgatherv(part, recv))
        return _in_rounds(counts, int(counts.max()), c, one_round)

    def alltoallv(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        """parts[j] (uint8) to rank j; returns what each rank sent this one, in rank order. The sizes
        go by Allgather, so that every rank knows how many rounds the largest part takes. Counted:
        the sizes, and the bytes this rank sends to the others (its own part stays)."""
        mine = [np.ascontiguousarray(p, dtype=np.uint8).reshape(-1) for p in parts]
        send_counts = np.array([p.size for p in mine], dtype=np.int64)
        counts = np.zeros((self.size, self.size), dtype=np.int64)  # [sender, receiver]
        self.sent_bytes += send_counts.nbytes + int(send_counts.sum() - send_counts[self.rank])
        self._run("Allgather", lambda: self._comm.Iallgather(send_counts, counts),
                  lambda: self._comm.Allgather(send_counts, counts))
        c = max(1, self.max_message_bytes // self.size)

        def one_round(k, recv):
            out = [p[k * c:(k + 1) * c] for p in mine]
            send = _spec(np.array([p.size for p in out], dtype=np.int64), out)
            self._run("Alltoallv", lambda: self._comm.Ialltoallv(send, recv), lambda: self._comm.Alltoallv(send, recv))
        return _in_rounds(counts[:, self.rank], int(counts.max()), c, one_round)


class World(PayloadCollectives):
    """Rank, size, node-local rank/size and counted collectives over MPI.COMM_WORLD. A node is what
    MPI calls one (the ranks that share memory), or under `mpitrain emulate` the emulated node that
    MPITRAIN_NODE names; `host_size` counts the ranks sharing this machine's cores either way."""

    ABORT_DRAIN_SECONDS = 0.5  # time the launcher gets to forward a failing rank's last line

    def __init__(self, stall_timeout: float = 0.0):
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        host, self._node, self.node_name = _host_and_node(self._comm, self.rank)
        self.host_size = host.Get_size()
        self.local_rank = self._node.Get_rank()
        self.local_size = self._node.Get_size()
        self._levels = None  # `node()`: the node and the network, for two-level collectives
        self._watch = StallWatch(self, self._comm.Dup())  # its communicator never carries data
        self.sent_bytes = 0
        self.calls = 0  # collective calls made (a piece of a large message is a call)
        self.stall_timeout = stall_timeout  # seconds; 0: wait forever (blocking calls)
        self.where = "start-up"  # named in a stall message; the training loop sets "step N"
        self.max_message_bytes = 2**31 - 2**20
        # rank 0's clock: ranks that start in different seconds still name one default run dir
        started = np.array([time.time()])
        self._comm.Bcast(started, root=0)
        self.started = float(started[0])

    def cores_per_rank(self) -> int:
        """The cores this rank may use: those the launcher bound it to, else the host's divided
        among the ranks on it."""
        bound = len(os.sched_getaffinity(0))
        return bound if bound < (os.cpu_count() or bound) else max(1, bound // self.host_size)

    def node_names(self) -> list[str]:
        """Every rank's node name, in rank order (a collective)."""
        return self.gather_text(self.node_name)

    def gather_text(self, text: str) -> list[str]:
        """Every rank's `text`, in rank order, on every rank (a collective)."""
        return [bytes(b).decode() for b in self.allgatherv(np.frombuffer(text.encode(), dtype=np.uint8))]

    # -- counters -------------------------------------------------------------------------
    def take_sent_bytes(self) -> int:
        """Bytes sent since the last call (and reset the counter)."""
        n, self.sent_bytes = self.sent_bytes, 0
        return n

    # -- collectives ----------------------------------------------------------------------
    def allreduce_(self, arr: np.ndarray, op: str = "sum") -> np.ndarray:
        """In-place Allreduce of a contiguous array; returns it."""
        self.sent_bytes += arr.nbytes
        for piece in pieces(arr, self.max_message_bytes):
            self._run("Allreduce", lambda: self._comm.Iallreduce(MPI.IN_PLACE, piece, op=_OPS[op]),
                      lambda: self._comm.Allreduce(MPI.IN_PLACE, piece, op=_OPS[op]))
        return arr

    def start_allreduce_(self, arr: np.ndarray) -> list:
        """Begin an in-place sum Allreduce of a contiguous array and return its requests: the
        caller lets MPI progress with `progress` (e.g. from backward hooks) and ends it with `wait`."""
        self.sent_bytes += arr.nbytes
        parts = pieces(arr, self.max_message_bytes)
        requests = [self._comm.Iallreduce(MPI.IN_PLACE, part, op=MPI.SUM) for part in parts]
        self.calls += len(requests)
        return requests

    @staticmethod
    def progress(requests: list) -> bool:
        """Test the requests (which is what moves a nonblocking collective along); True when all are done."""
        return MPI.Request.Testall(requests)

    def wait(self, requests: list, what: str = "Allreduce"):
        """Until the requests complete, within the stall deadline."""
        if not self.stall_timeout or self.size == 1:
            MPI.Request.Waitall(requests)
        else:
            self._watch.wait(what, lambda: MPI.Request.Testall(requests))

    def bcast_(self, arr: np.ndarray, root: int = 0) -> np.ndarray:
        """In-place broadcast from `root`; returns the array."""
        if self.rank == root:
            self.sent_bytes += arr.nbytes
        for piece in pieces(arr, self.max_message_bytes):
            self._run("Bcast", lambda: self._comm.Ibcast(piece, root=root), lambda: self._comm.Bcast(piece, root=root))
        return arr

    def gather(self, arr: np.ndarray, root: int = 0, out: np.ndarray | None = None) -> np.ndarray | None:
        """Stack every rank's equal-shaped array on `root` (None elsewhere), into `out` if given. On
        `root`, an `arr` that is `out[root]` itself is left where it is (MPI's in-place gather)."""
        arr = np.ascontiguousarray(arr)
        if self.rank != root:
            out = None
        elif out is None:
            out = np.empty((self.size,) + arr.shape, dtype=arr.dtype)
        elif out.shape != (self.size,) + arr.shape or out.dtype != arr.dtype or not out.flags.c_contiguous:
            raise ValueError(f"gather into {out.shape} {out.dtype}: needs contiguous {(self.size,) + arr.shape} {arr.dtype}")
        self.sent_bytes += arr.nbytes
        flat = arr.reshape(-1)
        step = max(1, self.max_message_bytes // max(1, self.size * arr.itemsize))
        if flat.size <= step:  # one call, straight into the result
            send = MPI.IN_PLACE if out is not None and _same_memory(arr, out[root]) else flat
            self._run("Gather", lambda: self._comm.Igather(send, out, root=root),
                      lambda: self._comm.Gather(send, out, root=root))
            return out
        for lo in range(0, flat.size, step):
            piece = flat[lo:lo + step]
            got = np.empty((self.size, piece.size), dtype=arr.dtype) if self.rank == root else None
            self._run("Gather", lambda: self._comm.Igather(piece, got, root=root),
                      lambda: self._comm.Gather(piece, got, root=root))
            if out is not None:
                out.reshape(self.size, -1)[:, lo:lo + step] = got
        return out

    def node_first(self, fn):
        """fn() on this node's first rank only; its result (JSON-able) is every rank's on the node, as
        if each had called fn. For work that one process per node can do for all of them (a file check
        that starts a process). The other ranks wait without the stall deadline: fn bounds its own time,
        and an exception in it ends the job."""
        if self.local_size == 1:
            return fn()
        text = np.frombuffer(json.dumps(fn()).encode(), dtype=np.uint8) if self.local_rank == 0 else None
        size = np.array([0 if text is None else text.size], dtype=np.int64)
        request = self._node.Ibcast(size, root=0)
        while not request.Test():  # asleep: ranks spinning in a blocking Bcast starved the first one's check
            time.sleep(0.005)
        if text is None:
            text = np.empty(int(size[0]), dtype=np.uint8)
        self._node.Bcast(text, root=0)
        self.calls += 2
        self.sent_bytes += size.nbytes + text.nbytes if self.local_rank == 0 else 0
        return json.loads(text.tobytes().decode())

    def first_rank_where(self, flag: bool) -> int | None:
        """The lowest rank whose `flag` is true, or None when it is false everywhere (a collective)."""
        v = np.array([self.rank if flag else self.size], dtype=np.int64)
        self.allreduce_(v, op="min")
        return None if v[0] == self.size else int(v[0])

    def barrier(self):
        self._run("Barrier", self._comm.Ibarrier, self._comm.Barrier)

    def abort(self, code: int = 1):
        """End every rank of the job now (the only safe exit when one rank fails alone)."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.size == 1:
            os._exit(code)
        # The launcher forwards each rank's output through pipes and tears them down when it
        # handles the abort; under load it can do so before reading the line just written, and
        # the user would get the exit code without the reason.
        time.sleep(self.ABORT_DRAIN_SECONDS)
        self._comm.Abort(code)

    # -- waiting with a deadline -----------------------------------------------------------
    def _run(self, what: str, start, blocking):
        self.calls += 1
        if not self.stall_timeout or self.size == 1:
            blocking()
            return
        self._watch.wait(what, start().Test)

    # -- for benchmarks only: bare library calls, uncounted ----------------------------------
    def raw_allreduce_(self, arr: np.ndarray):
        self._comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)

    def two_level_allreduce_(self, arr: np.ndarray):
        """arr (contiguous) summed over every rank in two levels: within the node (Reduce_scatter:
        each local rank gets the node's sum of its 1/local_size share), across the nodes among the
        ranks that hold the same share (Allreduce), within the node again (Allgatherv). Needs every
        node to have the same number of ranks. `bench allreduce` times it against the flat call."""
        node = self.node()
        flat, k = arr.reshape(-1), self.local_size
        counts = np.diff([j * flat.size // k for j in range(k + 1)])
        share = np.empty(int(counts[self.local_rank]), dtype=flat.dtype)
        node.comm.Reduce_scatter(flat, share, recvcounts=counts, op=MPI.SUM)
        node.network._comm.Allreduce(MPI.IN_PLACE, share, op=MPI.SUM)
        node.comm.Allgatherv(share, [flat, (counts, np.cumsum(counts) - counts)])

    def node(self) -> "Node":
        """This rank's node and network for two-level collectives, made on first use by every rank at
        once (a collective)."""
        if self._levels is None:
            self._levels = Node(self)
        return self._levels

    @staticmethod
    def library_version() -> str:
        return MPI.Get_library_version().strip().splitlines()[0]

    @staticmethod
    def wtime() -> float:
        return MPI.Wtime()


class Node:
    """Counted collectives among the ranks of this rank's node (shared memory on a real node, cheap
    beside the network), and `network`: a World of the ranks with this rank's local rank, one per
    node, for the two-level exchange (`compress/hierarchy.py`). Their waits keep the world's stall
    deadline, and a stall is named in world ranks. Every node must have the same number of ranks."""

    def __init__(self, world: World):
        self.world, self.comm = world, world._node
        self.rank, self.size = world.local_rank, world.local_size
        network = copy.copy(world)  # shares the world's stall watch, which names world ranks
        network._comm = world._comm.Split(world.local_rank, key=world.rank)
        network.rank, network.size = network._comm.Get_rank(), network._comm.Get_size()
        network.local_rank, network.local_size, network.sent_bytes, network.calls = 0, 1, 0, 0
        self.network = network

    def _fits(self, arr: np.ndarray) -> np.ndarray:  # MPI counts are C ints; pieces are not built here
        assert arr.nbytes <= self.world.max_message_bytes, "a two-level exchange of over 2 GiB"
        return arr

    def reduce_scatter_(self, flat: np.ndarray, share: np.ndarray, counts: list[int]):
        """share = the node's sum of flat's part for this local rank, flat cut in parts of `counts`."""
        self.world.sent_bytes += self._fits(flat).nbytes
        self.world._run("Reduce_scatter", lambda: self.comm.Ireduce_scatter(flat, share, counts, op=MPI.SUM),
                        lambda: self.comm.Reduce_scatter(flat, share, recvcounts=counts, op=MPI.SUM))

    def allgatherv_(self, share: np.ndarray, flat: np.ndarray, counts: list[int]):
        """Every local rank's share into its part of flat (the inverse of `reduce_scatter_`'s cut)."""
        self.world.sent_bytes += share.nbytes
        recv = [self._fits(flat), (counts, np.cumsum(counts) - counts)]
        self.world._run("Allgatherv", lambda: self.comm.Iallgatherv(share, recv),
                        lambda: self.comm.Allgatherv(share, recv))

    def gatherv(self, part: np.ndarray, counts: list[int]) -> np.ndarray | None:
        """Every local rank's part, end to end, on local rank 0 (None elsewhere)."""
        self.world.sent_bytes += part.nbytes
        out = np.empty(int(sum(counts)), dtype=part.dtype) if self.rank == 0 else None
        recv = [out, (counts, np.cumsum(counts) - counts)] if out is not None else None
        self.world._run("Gatherv", lambda: self.comm.Igatherv(part, recv), lambda: self.comm.Gatherv(part, recv))
        return out

    def allreduce_(self, arr: np.ndarray) -> np.ndarray:
        self.world.sent_bytes += self._fits(arr).nbytes
        self.world._run("Allreduce", lambda: self.comm.Iallreduce(MPI.IN_PLACE, arr, op=MPI.SUM),
                        lambda: self.comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM))
        return arr

    def texts(self, text: str) -> list[str]:
        """Every local rank's text, in local rank order."""
        mine = np.frombuffer(text.encode(), dtype=np.uint8)
        counts = self.allreduce_(np.where(np.arange(self.size) == self.rank, mine.size, 0))
        got = np.empty(int(counts.sum()), dtype=np.uint8)
        self.allgatherv_(mine, got, counts.tolist())
        return [bytes(got[a:a + c]).decode() for a, c in zip(np.cumsum(counts) - counts, counts)]


class StallWatch:
    """How a rank that waits on a collective learns, within --stall-timeout, that another will not
    come, and which: notices travel on a communicator of their own, so they never meet data."""

    def __init__(self, world: World, side):
        self.world, self.side = world, side

    def wait(self, what: str, done):
        """Until done() is true; past the stall deadline, or on a stall notice, end the job."""
        if done():
            return
        now = time.monotonic()
        deadline, look = now + self.world.stall_timeout, now + _LOOK_S
        while not done():
            now = time.monotonic()
            if now >= look:
                look = now + _LOOK_S
                if now >= deadline or self.side.Iprobe(source=MPI.ANY_SOURCE, tag=_STALL_TAG):
                    self.end_stall(what)
            os.sched_yield()  # ranks often outnumber cores; let the ones still computing run

    def end_stall(self, what: str, grace_s: float = 2.0):
        """Tell every rank this one is here, hear who else is, and let the lowest present rank end the job."""
        world = self.world
        me = np.array([world.rank], dtype=np.int64)
        notices = [self.side.Isend(me, dest=r, tag=_STALL_TAG) for r in range(world.size) if r != world.rank]
        present, status, heard = {world.rank}, MPI.Status(), np.zeros(1, dtype=np.int64)
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            while self.side.Iprobe(source=MPI.ANY_SOURCE, tag=_STALL_TAG, status=status):
                self.side.Recv(heard, source=status.Get_source(), tag=_STALL_TAG)
                present.add(int(heard[0]))
            time.sleep(0.01)
        missing = sorted(set(range(world.size)) - present)
        # A cut link splits the ranks: the side that is not the larger (at a tie, the one without rank 0)
        # is the one cut off, and waits, so that the line names the ranks behind the cut
        cut_off = 2 * len(present) < world.size or (2 * len(present) == world.size and 0 not in present)
        if world.rank != min(present) or cut_off:
            # the lowest present rank is ending the job; if it cannot (a busy rank 0 may not run its
            # Python for seconds), this one does, with the same line
            time.sleep(3 * grace_s)
        names = ", ".join(map(str, missing)) or "none (all present, yet the collective did not complete)"
        print(f"mpitrain: stalled at {world.where}: rank(s) {names} did not arrive in {what} within "
              f"{world.stall_timeout:g} s (--stall-timeout); ending the job with exit {STALLED}, "
              "no checkpoint of this step", file=sys.stderr, flush=True)
        del notices
        world.abort(STALLED)


def end_job_on_exception(world: World):
    """An uncaught exception on one rank ends the job, naming the rank and where it was, instead
    of leaving the other ranks waiting forever: with a traceback and exit 1, or, for an
    exception whose class sets `exit_code` (a user's mistake, a damaged file, a full disk), one
    line and that code; Ctrl-C, one line and 130."""
    def hook(etype, value, tb):
        if issubclass(etype, KeyboardInterrupt):  # Ctrl-C where no stop handler was installed
            sys.stderr.write(f"mpitrain: rank {world.rank}, {world.where}: interrupted\n")
            return world.abort(130)
        code = getattr(etype, "exit_code", None)
        if code is not None:
            sys.stderr.write(f"mpitrain: error: rank {world.rank}, {world.where}: {value}\n")
            return world.abort(code)
        sys.stderr.write(f"mpitrain: rank {world.rank}, {world.where}: {etype.__name__}: {value}\n")
        traceback.print_exception(etype, value, tb)
        world.abort(1)
    sys.excepthook = hook
