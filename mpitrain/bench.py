"""Benchmarks: `python -m mpitrain bench WHAT [--out DIR]`, run under mpiexec like training.

  allreduce   the trainer's dense aggregation path against a bare mpi4py Allreduce of the same
              bytes, interleaved in one run, for the default models.

Each writes WHAT-n<ranks>.json and .md into --out (rank 0) and prints the table.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from . import compress, models
from .cli import Parser
from .config import Config
from .data import Dataset, locate
from .layout import GradLayout

DEFAULT_MODELS = (("mlp", "digits"), ("cnn", "digits"), ("transformer", "shakespeare"))


def _layout(model_name: str, dataset: str, seed: int = 0) -> GradLayout:
    torch.manual_seed(seed)
    return GradLayout(models.build(model_name, Dataset(locate(dataset)).info))


def _median_max(world, samples: np.ndarray) -> float:
    """Median over repeats of the slowest rank's time (a collective is as slow as its slowest rank)."""
    world.allreduce_(samples, op="max")
    return float(np.median(samples))


def bench_allreduce(world, repeats: int) -> list[dict]:
    rows = []
    for model_name, dataset in DEFAULT_MODELS:
        layout = _layout(model_name, dataset)
        cfg = Config(model=model_name, dataset=dataset, compressor="dense")
        dense = compress.build(cfg, layout, world)
        raw = layout.flat_np  # the very same memory: only the code path differs
        t_trainer, t_raw = np.zeros(repeats), np.zeros(repeats)
        for i in range(-5, repeats):  # five warm-up rounds; the order alternates so neither goes first always
            for which in ((0, 1) if i % 2 else (1, 0)):
                layout.flat.normal_()
                world.barrier()
                t0 = world.wtime()
                dense.aggregate(i) if which == 0 else world.raw_allreduce_(raw)
                if i >= 0:
                    (t_trainer if which == 0 else t_raw)[i] = world.wtime() - t0
        trainer_s, raw_s = _median_max(world, t_trainer), _median_max(world, t_raw)
        rows.append({"model": model_name, "ranks": world.size, "bytes": layout.flat.numel() * 4,
                     "trainer_median_s": trainer_s, "raw_mpi4py_median_s": raw_s,
                     "speed_ratio": raw_s / trainer_s})
    return rows


def _markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv, world) -> int:
    parser = Parser(prog="mpitrain bench", description="Measure the trainer; see `python -m mpitrain bench --help`.")
    parser.quiet = world.rank != 0
    parser.add_argument("what", choices=["allreduce"])
    parser.add_argument("--out", default="bench", help="folder for the JSON and Markdown results")
    parser.add_argument("--repeats", type=int, default=100, help="timed repetitions per case")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = {"allreduce": bench_allreduce}[args.what](world, args.repeats)
    if world.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"{args.what}-n{world.size}")
        with open(stem + ".json", "w") as fh:
            json.dump({"benchmark": args.what, "mpi": world.library_version(), "rows": rows}, fh, indent=2)
        table = _markdown(rows)
        with open(stem + ".md", "w") as fh:
            fh.write(table)
        print(table, end="")
    return 0
