"""Starting a rank: MPI, the abort hook, the stop signals and the default run dir. No torch here,
so the command (a user of this like any loop) checks its flags before torch loads: on many ranks
reading torch from a shared filesystem, a mistyped flag would otherwise take a minute to report."""
from __future__ import annotations

import os
import signal
import time

from . import config

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
_STOP = {"requested": False, "interrupted_at": None}  # set by the handler; the ranks agree on it in the next exchange
AGAIN_S = 1.0  # a terminal's Ctrl-C reaches a rank twice (from the terminal and through mpiexec): not a second press


def init(stall_timeout: float = config.Config.stall_timeout, abort_on_exception: bool = True,
         stop_signals: bool = True):
    """Start MPI and return the world (rank, size, local_rank, local_size and counted collectives).

    abort_on_exception: an uncaught exception on any rank ends the whole job, naming the rank and
    where it was, instead of leaving the others waiting forever. stop_signals: SIGUSR1, SIGTERM and
    Ctrl-C set a flag that the next `Exchange.average` agrees on (`Averaged.stop`). Without an MPI library
    this raises comm.NoMPI (an ImportError) whose message says how to get one."""
    from .comm import World, end_job_on_exception
    world = World(stall_timeout=stall_timeout)
    if abort_on_exception:
        end_job_on_exception(world)
    if stop_signals:
        catch_stop_signals()
    return world


def default_run_dir(world) -> str:
    """runs/<UTC time of rank 0's start>: the folder the command uses when none is given, the same on every rank."""
    return config.default_run_dir(world.started)


def catch_stop_signals(interrupt: bool = True):
    """SIGUSR1, SIGTERM and (`interrupt`) Ctrl-C ask every rank to stop at the next exchange instead
    of killing this one: the command then checkpoints and exits 75. A second Ctrl-C ends the
    process at once (under mpiexec, mpiexec itself ends the job on a second Ctrl-C)."""
    for sig in STOP_SIGNALS if interrupt else STOP_SIGNALS[:2]:
        signal.signal(sig, request_stop)


def request_stop(signum=None, frame=None):
    """Ask every rank to stop at the next exchange (what SIGUSR1/SIGTERM/Ctrl-C do)."""
    if signum == signal.SIGINT:
        first, now = _STOP["interrupted_at"], time.monotonic()
        if first is not None and now - first > AGAIN_S:  # pressed again: the user means now
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return
        _STOP["interrupted_at"] = now if first is None else first
    _STOP["requested"] = True


def stop_requested() -> bool:
    return _STOP["requested"]
