"""What the benchmarks share: the default models, timing, tables and pictures."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from .. import models, train
from ..data import Dataset, locate
from ..layout import GradLayout

DEFAULT_MODELS = (("mlp", "digits"), ("cnn", "digits"), ("transformer", "shakespeare"))


def layout_of(model_name: str, dataset: str, seed: int = 0) -> GradLayout:
    torch.manual_seed(seed)
    return GradLayout(models.build(model_name, Dataset(locate(dataset)).info))


def fresh_run_dir(world, run_dir: str):
    """A benchmark's run dir is its own scratch: an earlier invocation's is removed, not set aside."""
    if world.rank == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    world.barrier()


def train_job(world, cfg) -> tuple[list[dict], dict]:
    """The command's loop on `cfg` (into a fresh cfg.run_dir): its metrics lines and its summary."""
    fresh_run_dir(world, cfg.run_dir)
    run = train.prepare(cfg, world)
    train.resume(run, world)
    summary = train.train(run, world)
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh], summary


def launch_env() -> dict:
    """This process's environment for the ranks a benchmark launches itself: without the MPI job's own
    variables (this process may be a rank of a world of one), nor mpitrain's settings, and one thread
    per rank (the launched ranks share the cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPIR_", "HYDRA_", "MPITRAIN_"))}
    return {**env, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def under_mpiexec() -> bool:
    return any(k in os.environ for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"))


def launch_each_size(what: str, sizes, out: str, args: list[str], env: dict) -> list[dict]:
    """Rank 0 alone: `python -m mpitrain.bench.WHAT ROWS_PATH ARGS...` under mpiexec -n N for each N
    (the module writes its rows as JSON to ROWS_PATH); every size's rows, in order."""
    from ..emulate import mpiexec_path
    rows = []
    for n in sizes:
        path = os.path.join(out, f"{what}-rows-n{n}.json")
        done = subprocess.run([mpiexec_path(), "-n", str(n), sys.executable, "-m", f"mpitrain.bench.{what}", path,
                               *args], env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"bench {what} at {n} ranks failed: {done.stderr.strip()[-2000:]}")
        with open(path) as fh:
            rows += json.load(fh)
    return rows


def median_max(world, samples: np.ndarray) -> float:
    """Median over repeats of the slowest rank's time (a collective is as slow as its slowest rank)."""
    world.allreduce_(samples, op="max")
    return float(np.median(samples))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def pyplot():
    """matplotlib's pyplot for files, or None (plots are optional: pip install matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("bench: matplotlib is not installed; plots skipped (pip install matplotlib)")
        return None


def markdown(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_tables(out: str, what: str, world, tables: dict, png=None):
    """WHAT-n<ranks>.json, .md and one CSV per table into `out`, and a PNG when matplotlib is there
    (`png(tables, path)`, or a bar chart of each table's first numeric column)."""
    stem = os.path.join(out, f"{what}-n{world.size}")
    with open(stem + ".json", "w") as fh:
        json.dump({"benchmark": what, "mpi": world.library_version(), "ranks": world.size, "tables": tables}, fh,
                  indent=2)
    text = "".join(f"\n### {name}\n\n" + markdown(rows) for name, rows in tables.items())
    with open(stem + ".md", "w") as fh:
        fh.write(text)
    for i, (name, rows) in enumerate(tables.items()):
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(stem + (f"-{i}" if len(tables) > 1 else "") + ".csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, keys)
            writer.writeheader()
            writer.writerows(rows)
    if pyplot() is not None:
        (png or bar_chart)(tables, stem + ".png")
    return text


def bar_chart(tables: dict, path: str):
    """One panel per table: its first measured number per row, rows labelled by their text columns."""
    plt = pyplot()
    fig, axes = plt.subplots(len(tables), 1, figsize=(9, 3.2 * len(tables)), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], tables.items()):
        numeric = [k for k in rows[0] if isinstance(rows[0][k], float)] if rows else []
        if not numeric:
            continue
        key = numeric[0]
        labels = [" ".join(str(v) for v in r.values() if isinstance(v, str)) or str(i) for i, r in enumerate(rows)]
        ax.barh(range(len(rows)), [r.get(key) or 0.0 for r in rows], color="C0")
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.set_xlabel(key)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
