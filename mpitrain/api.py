"""The public API: what a user's own training loop calls. The command's loop (train.py) is its first user.

    import mpitrain

    world = mpitrain.init()                     # rank, size, local rank; aborts the job on any rank's exception
    exchange = mpitrain.Exchange(model, world, compressor="greedylore", rank=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    resumed = mpitrain.load_checkpoint(exchange, optimizer, run_dir="runs/mine")
    for step in range(resumed.step if resumed else 0, steps):
        x, y = batches.batch_at(step)           # mpitrain.ShardedBatches: this rank's rows of the global batch
        exchange.zero_grad()
        exchange.backward(loss_fn(model(x), y))
        averaged = exchange.average(step)       # every rank now holds the global mean gradient
        if not averaged.nonfinite:
            optimizer.step()
        if averaged.stop:                       # SIGUSR1/SIGTERM/Ctrl-C on any rank, agreed by all
            mpitrain.save_checkpoint("runs/mine", step + 1, exchange, optimizer)
            break

`import mpitrain` imports neither mpi4py nor torch; `init()` is where MPI starts.
"""
from __future__ import annotations

import contextlib
import os
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, compress, device, launch, rundir
from .config import Config, UsageError, checked
from .averaging import ParameterAveraging, Round
from .device import to_host
from .layout import GradLayout, all_finite, global_norm
from .named_state import optimizer_tensors

# starting a rank lives in launch (no torch there, so the command starts with it); the API names it too
init, default_run_dir = launch.init, launch.default_run_dir
catch_stop_signals, request_stop = launch.catch_stop_signals, launch.request_stop


def set_threads(world, threads: int = 0) -> int:
    """Torch threads for this rank: `threads`, else OMP_NUM_THREADS, else the cores this process may
    use divided by the ranks on its node (oversubscribed threads make steps 30x slower)."""
    n = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    torch.set_num_threads(n := n or world.cores_per_rank())
    return n


@dataclass
class Averaged:
    """What one exchange agreed on, the same on every rank."""
    loss: float        # the global mean of the loss passed to `backward` (0.0 when a rank's was non-finite)
    nonfinite: bool    # some rank's loss or gradient was NaN/Inf: its share was zeroed; skip the step
    stop: bool         # some rank was asked to stop (SIGUSR1/SIGTERM/Ctrl-C or `request_stop`)
    wire_bytes: int    # bytes this rank handed to the network in this exchange
    stats: dict = field(default_factory=dict)  # the compressor's report (captured energy, ranks, ...)
    grad_norm: float | None = None  # with grad_clip: the agreed gradient's 2-norm before clipping


class Exchange:
    """Averages a model's gradients over the ranks, in place, through any compressor.

    Building it moves the model's trainable parameters and gradients into flat buffers (the
    Parameter objects stay the same, so an optimizer may be built before or after). Zero gradients
    with `zero_grad()` (never set them to None). Options are the command's flags by their field
    names (`rank=4`, `error_feedback="on"`, ...); `cfg` passes a whole Config instead.

    `accumulate=K`: call `backward` once per micro-batch, K times a step, then `average` once: the
    exchange (and its overlap with backward) happens on the K-th. `grad_clip=NORM`: `average` clips
    the agreed gradient to that 2-norm (every rank alike) and reports the norm it had."""

    def __init__(self, model: torch.nn.Module, world, compressor: str = "dense", cfg: Config | None = None,
                 **options):
        if compressor not in compress.names():
            raise UsageError(f"unknown compressor {compressor!r}; choose one of {', '.join(compress.names())}")
        options.setdefault("model", type(model).__name__)
        options.setdefault("run_dir", default_run_dir(world))
        self.cfg = cfg or checked(compressor=compressor, **options)
        self.device = device.choose(self.cfg.device, world.local_rank)
        device.check_supported(self.cfg, self.device)
        model.to(self.device)
        try:
            self.layout = GradLayout(model)
        except ValueError as e:
            raise UsageError(f"model {self.cfg.model}: {e}") from None
        self.model, self.world = model, world
        self.compressor = compress.build(self.cfg, self.layout, world)
        self.wire = self.compressor.wire
        self.averaging = None if self.cfg.average_every == 1 else ParameterAveraging(
            self.layout, world, self.compressor, self.cfg.average_every, self.cfg.outer_optimizer,
            self.cfg.outer_lr, self.cfg.outer_momentum, self.cfg.seed)
        self.wire_bytes_total = 0
        self._share, self._micro = None, 0  # this step's loss share so far, and backward calls
        self._overlapping = False  # buckets in flight since `backward`
        if self.compressor.overlaps and self.averaging is None:
            for slot, p in zip(self.layout.slots, self.layout.tensors):
                if slot.is_matrix:
                    p.register_post_accumulate_grad_hook(lambda p, slot=slot: self.compressor.ready(slot))

    def zero_grad(self):
        self.layout.zero_grad()
        self._share, self._micro = None, 0

    def backward(self, loss: torch.Tensor):
        """Backward of this rank's share of the global mean loss (loss / world size): the gradients
        come out already scaled, so the exchange needs no averaging pass over memory. With parameter
        averaging the gradients stay this rank's own (backward of the loss itself). With accumulate=K
        each call adds a K-th of that; the K-th call starts the exchange."""
        self._micro += 1
        if self._micro > self.cfg.accumulate:
            raise UsageError(f"backward called {self._micro} times since the last average or zero_grad; "
                             f"accumulate={self.cfg.accumulate} allows that many")
        share = loss / (self.cfg.accumulate * (self.world.size if self.averaging is None else 1))
        self._overlapping = self._micro == self.cfg.accumulate and self.compressor.overlaps and self.averaging is None
        if self._overlapping:
            self.compressor.begin()  # the hooks start each bucket's exchange as backward finishes it
        share.backward()
        self._share = share.detach() if self._share is None else self._share + share.detach()

    def average(self, step: int, loss: torch.Tensor | None = None) -> Averaged:
        """Replace every rank's gradients with the global mean. After `backward` no loss is needed;
        after a plain `loss.backward()` pass the loss (or None) and the gradients are scaled here.
        With parameter averaging (average_every > 1) the gradients stay this rank's own and only
        the control words (mean loss, non-finite flag, stop request) cross the network, in one
        tiny Allreduce; `average_parameters` is where the ranks meet. On rank 0, a background
        checkpoint write that failed raises its CannotWrite here, at the next step, not the next save."""
        checkpoint.WRITER.raise_failure()
        if self._micro not in (0, self.cfg.accumulate):
            raise UsageError(f"average after {self._micro} backward calls; accumulate={self.cfg.accumulate} "
                             "needs that many, one per micro-batch")
        grads, size, local = self.layout.grads, self.world.size, self.averaging is not None
        share = self._share
        if share is None:
            if not local:
                grads.mul_(1.0 / size)
            share = loss.detach() if loss is not None else torch.zeros(())
            share = share if local else share / size
        # With buckets in flight the gradients are the exchange's until it ends: the rest is checked after
        self._overlapping = self._overlapping and self.compressor.in_flight
        checked = grads[self.layout.dense_offset:] if self._overlapping else grads
        finite = bool(torch.isfinite(share)) and all_finite(checked)
        if not finite:
            checked.zero_()  # nothing non-finite enters the exchange (or the optimizer); the flag says why
        self.layout.control.set((float(share) / size if local else float(share)) if finite else 0.0, not finite,
                                launch.stop_requested())
        before = self.world.sent_bytes
        if local:
            self.wire.allreduce_(self.layout.flat[self.layout.numel:])
        else:
            self.compressor.aggregate(step)
        if self._overlapping and not all_finite(grads):
            grads.zero_()  # a rank's non-finite share reached every rank: every rank skips alike
            self.layout.control.raise_nonfinite()
        self._share, self._micro, self._overlapping = None, 0, False
        loss_sum, nonfinite, stop = self.layout.control.values()
        norm = None
        if self.cfg.grad_clip and not nonfinite:  # after the exchange: what error feedback kept is what was sent
            norm = global_norm(grads)
            if norm > self.cfg.grad_clip:  # the same rule, and so the same bits, on every rank
                grads.mul_(self.cfg.grad_clip / (norm + 1e-6))
        sent = self.world.sent_bytes - before
        self.wire_bytes_total += sent
        return Averaged(loss_sum, bool(nonfinite), bool(stop), sent, {} if local else dict(self.compressor.stats),
                        norm)

    def average_parameters(self, step: int, last: bool = False) -> Round | None:
        """After the optimizer step of step `step` (numbered from 0): with average_every = H > 1, at
        every H-th step (and at the `last`) the ranks average what their parameters moved since the
        last average, through the compressor, and take the outer step; every rank then holds the
        same parameters. Returns the Round, or None when this step was a local one (or H = 1)."""
        averaging = self.averaging
        if averaging is None:
            return None
        averaging.local_steps += 1
        if not averaging.due(step + 1, last):
            return None
        done = averaging.average(step + 1)
        self.wire_bytes_total += done.wire_bytes
        return done

    @contextlib.contextmanager
    def agreed_parameters(self):
        """Within it the model holds the parameters every rank agrees on: with parameter averaging,
        between averages, the last average's (for evaluation); the gradient buffer holds this rank's
        own meanwhile, so nothing is allocated. A no-op otherwise."""
        averaging = self.averaging
        if averaging is None or not averaging.local_steps:
            yield
            return
        params, scratch = self.layout.params, self.layout.grads
        scratch.copy_(params)
        params.copy_(averaging.anchor)
        try:
            yield
        finally:
            params.copy_(scratch)

    def check_sync(self, optimizer: torch.optim.Optimizer, step: int) -> bool:
        """Compare every rank's checksum of parameters and optimizer state with rank 0's (one small
        Allreduce). On a mismatch, with on_divergence="abort" raise Diverged naming the ranks;
        with "rebroadcast" copy rank 0's state to every rank and return True."""
        world = self.world
        # With parameter averaging each rank's parameters and optimizer are its own between averages;
        # what must agree is the anchor and the outer momentum.
        if self.averaging is None:
            agreed, state = self.layout.params, optimizer_tensors(optimizer)
        else:
            agreed, state = self.averaging.anchor, self.averaging.outer_state()
        opt_crc = 0
        for tensor in state:
            opt_crc = zlib.crc32(to_host(tensor.contiguous(), copy=False), opt_crc)
        sums = np.zeros(world.size, dtype=np.uint64)
        sums[world.rank] = (zlib.crc32(to_host(agreed, copy=False)) << 32) | opt_crc
        world.allreduce_(sums)
        differ = np.flatnonzero(sums != sums[0])
        if not differ.size:
            return False
        ranks = ", ".join(map(str, differ))
        if self.cfg.on_divergence == "abort":
            raise Diverged(f"sync check at step {step}: rank(s) {ranks} hold parameters or optimizer state "
                           "that differ from rank 0's (--on-divergence abort); no checkpoint written")
        for tensor in [agreed] + state:  # contiguous tensors, broadcast in place
            self.wire.bcast_(tensor)
        if self.averaging is not None and not self.averaging.local_steps:
            self.layout.params.copy_(self.averaging.anchor)
        if world.rank == 0:
            print(f"mpitrain: sync check at step {step}: rank(s) {ranks} differed from rank 0; "
                  "rank 0's parameters and optimizer state broadcast (--on-divergence rebroadcast)", flush=True)
        return True


class Diverged(Exception):
    """A sync check found ranks whose parameters or optimizer state differ from rank 0's."""


# -- checkpoints for a user's loop: the command's format, readable by `mpitrain inspect` ----------

@dataclass
class Resumed:
    """What `load_checkpoint` restored besides the model, optimizer and compressor."""
    path: Path
    step: int
    epoch: int
    wire_bytes_total: int
    extra: dict        # the arrays passed to save_checkpoint(extra=...)
    extra_json: object  # the JSON-able value passed to save_checkpoint(extra_json=...)


def _contents(exchange: Exchange, optimizer, **cfg_changes) -> checkpoint.Contents:
    return checkpoint.Contents(replace(exchange.cfg, **cfg_changes), exchange.model, optimizer, exchange.compressor,
                               exchange.layout, exchange.averaging)


def save_checkpoint(run_dir: str, step: int, exchange: Exchange, optimizer: torch.optim.Optimizer, *,
                    epoch: int = 0, keep_last: int | None = None, wire_bytes_total: int | None = None,
                    extra: dict | None = None, extra_json=None, background: bool = True) -> Path | None:
    """Every rank calls it; rank 0 writes RUN_DIR/checkpoints/ckpt-STEP.h5 atomically and moves
    `latest`. `extra`: the caller's own arrays by name; `extra_json`: any JSON-able value.
    background: rank 0 copies the state into host buffers and returns; a thread writes and fsyncs
    (one write at a time; `wait_for_checkpoints()` before exiting). Returns the path on rank 0
    (on disk once `latest` names it), None elsewhere. A run dir another job holds is refused
    (UsageError on rank 0, which ends the job: see `rundir.claim`)."""
    if exchange.world.rank == 0:
        rundir.claim(str(run_dir))
    contents = _contents(exchange, optimizer, run_dir=str(run_dir),
                         keep_last=exchange.cfg.keep_last if keep_last is None else keep_last)
    total = exchange.wire_bytes_total if wire_bytes_total is None else wire_bytes_total
    return checkpoint.save(contents, exchange.world, step, epoch, total, extra or {}, extra_json, background)


def wait_for_checkpoints():
    """Until rank 0's background checkpoint write (if any) is on disk; re-raises its failure."""
    checkpoint.WRITER.wait()


def load_checkpoint(exchange: Exchange, optimizer: torch.optim.Optimizer, resume: str = "auto",
                    run_dir: str = "") -> Resumed | None:
    """Restore the checkpoint `resume` names (auto: RUN_DIR's `latest`, falling back to the newest
    that verifies; none; or a path) into the model, optimizer and compressor on every rank. Rank 0
    checks the file first; a file that fails or does not fit raises UsageError on every rank. With
    `run_dir`, this job takes the folder (`rundir.take`). Returns None when there is nothing to
    resume, after every rank took rank 0's parameters."""
    world = exchange.world
    wait_for_checkpoints()
    contents = _contents(exchange, optimizer, resume=resume, run_dir=str(run_dir or exchange.cfg.run_dir))
    path, error = None, None
    if world.rank == 0:
        try:
            notes = rundir.take(run_dir, resume) if run_dir else []  # named by the caller: this job writes there
            path, chosen = rundir.choose(contents.cfg, contents)
            notes += chosen
        except UsageError as e:
            error, notes = str(e), e.notes
        for note in notes:
            print(f"mpitrain: {note}", flush=True)
    message = np.zeros(4097, dtype=np.uint8)  # [status, utf-8 text]: 0 fresh, 1 resume from path, 2 error
    if world.rank == 0:
        text = (error or str(path or "")).encode("utf-8", "backslashreplace")[:4096]
        message[0], message[1:1 + len(text)] = (2 if error else 1 if path else 0), np.frombuffer(text, np.uint8)
    usual = world.stall_timeout  # the other ranks wait while rank 0 checks files, each within its own deadline
    world.stall_timeout = usual and usual + rundir.check_budget(contents.cfg)
    try:
        world.bcast_(message)
    finally:
        world.stall_timeout = usual
    text = message[1:].tobytes().rstrip(b"\0").decode("utf-8", "replace")
    if message[0] == 2:
        raise UsageError(text)
    if message[0] == 0:
        exchange.wire.bcast_(exchange.layout.params)
        if exchange.averaging is not None:
            exchange.averaging.reset_anchor()
        return None
    attrs, extra, extra_json = checkpoint.load(Path(text), contents, world)
    exchange.wire_bytes_total = int(attrs["wire_bytes_total"])
    if world.rank == 0:
        print(f"mpitrain: resumed from {text} at step {attrs['step']}", flush=True)
    return Resumed(Path(text), int(attrs["step"]), int(attrs["epoch"]), int(attrs["wire_bytes_total"]),
                   extra, extra_json)
