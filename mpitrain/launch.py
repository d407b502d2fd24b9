"""Starting a rank: MPI, the abort hook, the stop signals and the default run dir. No torch here,
so the command (a user of this like any loop) checks its flags before torch loads: on many ranks
reading torch from a shared filesystem, a mistyped flag would otherwise take a minute to report."""
from __future__ import annotations

import signal

from . import config

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_STOP = {"requested": False}  # set by the signal handler; the ranks agree on it in the next exchange


def init(stall_timeout: float = config.Config.stall_timeout, abort_on_exception: bool = True,
         stop_signals: bool = True):
    """Start MPI and return the world (rank, size, local_rank, local_size and counted collectives).

    abort_on_exception: an uncaught exception on any rank ends the whole job, naming the rank and
    where it was, instead of leaving the others waiting forever. stop_signals: SIGUSR1 and SIGTERM
    set a flag that the next `Exchange.average` agrees on (`Averaged.stop`). Without an MPI library
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


def catch_stop_signals():
    """SIGUSR1 and SIGTERM ask every rank to stop at the next exchange instead of killing this one."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, request_stop)


def request_stop(signum=None, frame=None):
    """Ask every rank to stop at the next exchange (what SIGUSR1/SIGTERM do)."""
    _STOP["requested"] = True


def stop_requested() -> bool:
    return _STOP["requested"]
