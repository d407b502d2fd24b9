"""The interface every compressor implements, and the registry that names them."""
from __future__ import annotations

import numpy as np

from ..device import Wire


class Compressor:
    """Turns each rank's gradient share (in the layout's flat buffer) into the global mean, in place.

    The loop scales the loss by 1/world_size before backward, which costs nothing (it seeds
    autograd), so the buffer already holds each rank's share g_i / N and the global mean is the
    plain sum of the shares: no averaging pass over memory after the exchange. Every compressor
    here is linear or scale-equivariant, so compressing g_i / N is compressing g_i, scaled.

    `aggregate(step)` is the only place ranks exchange gradients. It must carry the layout's
    control words (`layout.control`, also shares) through one of its Allreduces, summed. `stats` holds what the metrics line reports
    about the last step (wire bytes are counted by comm, not here).
    """

    name = ""
    # Linear and shared across ranks: the trajectory depends on the residuals only through their
    # sum, so a checkpoint may store that sum once and resume exactly at any world size.
    linear = True
    # The residuals may be re-sharded (their sum stored once, each rank resuming from sum / N): the
    # sum of what all ranks will send stays that of the uninterrupted run. Exact when linear.
    reshardable = True
    # Biased compressors need error feedback to converge; --error-feedback auto turns it on for them.
    biased = True
    # Runs compiled loops (`kernels`): numba's import and its first kernel load (its type registries)
    # are then paid while the compressor is built, with the rest of the set-up, not in the first steps.
    compiled = False
    # Exchanges a device's tensors where they are (dense, the low-rank compressors); the others run
    # on a host twin of the layout when the model trains on a device (`host.OnHost`).
    on_device = False
    # Runs for one node share of the slots, across the nodes (`hierarchy.NodeSharded`)
    two_level = False

    def __init__(self, layout, world, cfg):
        self.layout = layout
        self.world = world
        self.wire = Wire(world, layout.device)  # collectives on tensors, wherever the layout lives
        self.cfg = cfg
        self.stats: dict = {}
        self.error_feedback = cfg.error_feedback == "on" or (cfg.error_feedback == "auto" and self.biased)
        if self.compiled:
            load_kernels()

    # Overlap with backward (--bucket-mb): `begin()` before backward, `ready(slot)` from each
    # matrix's post-accumulate-grad hook, `aggregate` then finishes what is in flight.
    overlaps = False
    buckets: "Buckets | None" = None  # what `ready` counts down, for the compressors that overlap

    @property
    def in_flight(self) -> bool:
        """Backward handed this step's gradients (or their first round) to the exchange already."""
        return self.buckets is not None and self.buckets.in_flight

    def begin(self) -> None:
        pass

    def ready(self, slot) -> None:
        if self.buckets is not None:
            self.buckets.ready(slot)

    def aggregate(self, step: int) -> None:
        raise NotImplementedError

    def state_dict(self, copy: bool = True) -> dict:
        """{"local": this rank's arrays, "shared": arrays equal on every rank}; copy=False gives views
        of the live buffers, for a caller that copies them before the next step."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def collect_state(self) -> None:
        """A collective every rank calls before a checkpoint reads `state_dict` on rank 0, for a
        compressor whose shared state is spread over ranks (`hierarchy.NodeSharded`)."""

    def state_layout(self) -> dict[str, list[tuple[str, tuple]]]:
        """For each state array that is per-tensor pieces laid end to end (the "residual", keys of
        "shared"), its pieces in order as (parameter name, shape): a checkpoint stores each piece
        under its parameter's name, for the people who inspect it."""
        return {}


class Buckets:
    """The matrices in buckets (`layout.buckets`) whose exchange starts as soon as backward has
    finished every matrix of a bucket, in bucket order on every rank, so that every rank issues
    the same collectives in the same order whatever order its hooks fire in. `start(bucket)` does
    a bucket's work ((lo, hi, slots), as `layout.buckets` gives it) and returns the requests of
    its nonblocking collectives. Work that depends on the step number (shared random draws, keys)
    reads `step`, the step backward is preparing; `finish` refuses any other."""

    def __init__(self, layout, world, bucket_bytes: int, start):
        # on a device, one exchange after backward for now: its buckets would stage through the host
        # on a side stream, which is not built yet
        buckets = layout.buckets(bucket_bytes) if bucket_bytes and layout.device.type == "cpu" else []
        self.buckets = buckets if len(buckets) > 1 else []  # one bucket would only add a collective
        self.world, self.start = world, start
        self._bucket_of = {slot.index: i for i, (_, _, slots) in enumerate(self.buckets) for slot in slots}
        self._waiting, self.started, self.requests, self.step = [], 0, None, None

    def __len__(self) -> int:
        return len(self.buckets)

    def begin(self, step: int | None = None) -> None:
        """Backward of step `step` is about to run: buckets start as their gradients become final."""
        self._waiting = [len(slots) for _, _, slots in self.buckets]
        self.started, self.requests, self.step = 0, [], step

    @property
    def in_flight(self) -> bool:
        """Since `begin`, until `finish`."""
        return self.requests is not None

    def ready(self, slot) -> None:
        """A matrix's gradient is final; every hook also tests what is in flight (that moves it)."""
        if self.requests is None:
            return
        self._waiting[self._bucket_of[slot.index]] -= 1
        while self.started < len(self.buckets) and not self._waiting[self.started]:
            self._start_next()
        self.world.progress(self.requests)

    def _start_next(self):
        self.requests += self.start(self.buckets[self.started])
        self.started += 1

    def finish(self, last=lambda: [], step: int | None = None) -> None:
        """Start the buckets backward never reached, then `last()`'s collectives, and wait for all."""
        if step != self.step:
            raise RuntimeError(f"step {step} after backward prepared step {self.step}: with --bucket-mb > 0 "
                               "steps must be numbered consecutively")
        while self.started < len(self.buckets):
            self._start_next()
        self.requests += last()
        self.world.wait(self.requests)
        self.requests = None


_compiled = None


def kernels():
    """The compiled loops: numba loads with the first compressor that uses them, not with the package.
    Kept once loaded: an import statement per call cost ~5 us, and a quantizer calls this ~100
    times a step."""
    global _compiled
    if _compiled is None:
        from . import kernels as compiled
        _compiled = compiled
    return _compiled


def load_kernels():
    """numba imported and one kernel loaded from its cache: the first load of any initialises numba's
    type registries, the larger part of its one-time cost."""
    kernels().position_weights(np.zeros(1, dtype=np.uint64))


REGISTRY: dict[str, type[Compressor]] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
    REGISTRY[cls.name] = cls
    return cls
