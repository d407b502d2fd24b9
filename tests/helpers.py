"""Launching the trainer and test workers as real processes, under a real mpiexec.

Starting a rank, which imports torch, is most of a small run's time; so a test's fresh runs of one
worker, and the runs of a parametrized test's instances with as many ranks, may share one launch
(workers/runs.py). A resume never shares the process of the run that wrote its checkpoint."""
from __future__ import annotations

import json
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


def runs_in_one_launch(n: int, worker, runs: list, **extra_env) -> subprocess.CompletedProcess:
    """`mpiexec -n N python WORKER ARGS` for each ARGS of runs, all in one launch (workers/runs.py):
    each rank imports torch once, which is most of a small run's time."""
    args = json.dumps([[str(a) for a in run] for run in runs])
    return mpi(n, [WORKERS / "runs.py", worker, args], timeout=60 + 60 * len(runs), **extra_env)


_LAUNCHED: dict = {}


def one_launch_per_world_size(request, tmp_path_factory, case_of) -> Path:
    """The output folder of this parametrized test's worker run; the runs of every selected instance
    of the same test with the same number of ranks share one launch (workers/runs.py), since
    starting the ranks is most of such a test's time. case_of(**params) -> (ranks, worker, args
    after the output folder)."""
    def case(item):
        n, worker, args = case_of(**item.callspec.params)
        return n, (str(worker), *map(str, args))

    test = request.node
    n, mine = case(test)
    key = (test.nodeid.split("[")[0], n)
    if key not in _LAUNCHED:
        same_test = [item for item in request.session.items if item.nodeid.split("[")[0] == key[0]]
        runs = list(dict.fromkeys(run for m, run in map(case, same_test) if m == n))
        base = tmp_path_factory.mktemp(test.originalname[:40])
        folders = [base / str(i) for i in range(len(runs))]
        for folder in folders:
            folder.mkdir()
        spec = [[str(folder), *args] for folder, (_, *args) in zip(folders, runs)]
        worker = runs[0][0]
        assert all(run[0] == worker for run in runs), "one worker per test"
        r = runs_in_one_launch(n, worker, spec)
        assert r.returncode == 0, r.stderr
        _LAUNCHED[key] = dict(zip(runs, folders))
    return _LAUNCHED[key][mine]
