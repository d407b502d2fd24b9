"""Command line: `mpitrain [train flags]`, `mpitrain bench WHAT`, and the exit-code contract.

Exit codes: 0 done; 2 a usage/config/data mistake (one line from one rank, every rank exits 2);
3 a rank stalled (waited in a collective past --stall-timeout; the line names the ranks that did
not arrive); 75 stopped by SIGUSR1/SIGTERM/Ctrl-C after writing a checkpoint (requeue me); 1 anything
else (an uncaught exception on any rank aborts the whole job, naming rank and step; a failed
sync check names the ranks that differ from rank 0).
"""
from __future__ import annotations

import sys

from .config import Parser, UsageError


def agree_on_error(world, error: str | None) -> bool:
    """Every rank learns whether any rank failed; the lowest failing rank prints its line."""
    first = world.first_rank_where(error is not None)
    if first is not None and first == world.rank:
        print(f"mpitrain: error: {error}", file=sys.stderr, flush=True)
    return first is not None


def train_main(argv, world) -> int:
    from . import compress  # the names only: torch is imported after the flags are known to be good
    from .config import add_arguments, resolve

    everything = "--help-all" in argv
    argv = ["--help" if a == "--help-all" else a for a in argv]
    parser = Parser(prog="mpitrain", usage="mpiexec -n N python -m mpitrain [flags]",
                    description="MPI data-parallel training with gradient compression. Also: mpitrain bench WHAT, "
                    "mpitrain emulate (an emulated cluster), mpitrain inspect CHECKPOINT, mpitrain plot RUN_DIR.",
                    epilog=None if everything else "These are the main flags; every flag: mpitrain --help-all. "
                    "Any flag can also be set in a TOML file (--config) or as MPITRAIN_<NAME>.")
    parser.quiet = world.rank != 0
    add_arguments(parser, compress.names(), everything)
    error, args, cfg = None, None, None
    try:
        args = parser.parse_args(argv)
        cfg = resolve(args, compressors=compress.names(), now=world.started)
    except UsageError as e:
        error = str(e)
    if agree_on_error(world, error):
        return 2
    if args.print_config:
        if world.rank == 0:
            print(cfg.to_json())
        return 0
    from . import checkpoint, launch, train
    launch.catch_stop_signals()
    run = None
    try:
        train.set_threads(cfg, world)
        world.stall_timeout = cfg.stall_timeout
        run = train.prepare(cfg, world)
    except UsageError as e:
        error = str(e)
    if agree_on_error(world, error):
        return 2
    try:
        train.resume(run, world)
    except UsageError as e:
        error = str(e)  # the same line on every rank that failed; the lowest prints it
    if agree_on_error(world, error):
        return 2
    try:
        train.train(run, world)
    except train.TrainingStopped as stop:
        checkpoint.WRITER.wait()  # an earlier checkpoint may still be on its way to disk
        if world.rank == 0:
            print(f"mpitrain: {stop}", file=sys.stderr, flush=True)
        return stop.code
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["inspect"]:  # reading checkpoints never starts MPI
        from .inspect import main as inspect_main
        return inspect_main(argv[1:])
    if argv[:1] == ["plot"]:  # nor does drawing runs
        from .plot import main as plot_main
        return plot_main(argv[1:])
    if argv[:1] == ["emulate"]:  # the launcher of an emulated cluster is no rank of it
        from .emulate import main as emulate_main
        return emulate_main(argv[1:])
    from . import launch

    # MPI starts, and the flags are checked, before torch is imported (see launch)
    try:
        world = launch.init(stall_timeout=0.0, stop_signals=False)  # the watchdog's timeout comes with the flags
    except ImportError as e:  # comm.NoMPI: no MPI on this machine
        print(f"mpitrain: {e}", file=sys.stderr)
        return 1
    if argv[:1] == ["bench"]:
        from . import bench
        launch.catch_stop_signals(interrupt=False)  # Ctrl-C ends a benchmark (one line), it does not checkpoint
        error, args = None, None
        try:
            args = bench.parse(argv[1:], world)
        except UsageError as e:
            error = str(e)
        if agree_on_error(world, error):
            return 2
        return bench.main(args, world)
    return train_main(argv, world)
