"""Launching the trainer and test workers as real processes, under a real mpiexec."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable))


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("MPITRAIN_")}
    e.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1",
             OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(extra)
    return e


def run(cmd, timeout=120, cwd=None, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(**extra_env),
                          cwd=cwd or ROOT)


def mpi(n: int, args, timeout=120, **extra_env) -> subprocess.CompletedProcess:
    """`mpiexec -n N python ARGS`; a test fails on a hang instead of hanging."""
    assert MPIEXEC, "mpiexec not found beside the test's python (pip install mpich)"
    return run([MPIEXEC, "-n", str(n), sys.executable] + [str(a) for a in args], timeout=timeout, **extra_env)


def trainer(n: int, *flags, timeout=120, **extra_env) -> subprocess.CompletedProcess:
    """`python -m mpitrain FLAGS`, under mpiexec -n N (or alone when N is 0)."""
    args = ["-m", "mpitrain"] + [str(f) for f in flags]
    if n == 0:
        return run([sys.executable] + args, timeout=timeout, **extra_env)
    return mpi(n, args, timeout=timeout, **extra_env)


def two_nodes(*args) -> list:
    """The command line of mpiexec running `python ARGS` on two emulated nodes of two ranks each, named
    a and b as `mpitrain emulate` names its nodes (MPITRAIN_NODE)."""
    block = lambda node: ["-n", "2", "env", f"MPITRAIN_NODE={node}", sys.executable, *map(str, args)]  # noqa: E731
    return [MPIEXEC, *block("a"), ":", *block("b")]
