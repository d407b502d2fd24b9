"""The trainer's dense aggregation against a bare mpi4py Allreduce of the same bytes."""
from __future__ import annotations

import numpy as np

from .. import compress
from ..config import Config
from .common import DEFAULT_MODELS, layout_of, median_max

NAME = "allreduce"
ABOUT = "the trainer's dense exchange (blocking and watched) against a bare mpi4py Allreduce"


def bench_allreduce(world, repeats: int) -> list[dict]:
    rows = []
    for model_name, dataset in DEFAULT_MODELS:
        layout = layout_of(model_name, dataset)
        cfg = Config(model=model_name, dataset=dataset, compressor="dense")
        dense = compress.build(cfg, layout, world)
        raw = layout.flat_np  # the very same memory: only the code path differs
        times = np.zeros((3, repeats))  # the trainer's path blocking, bare mpi4py, the trainer's path watched
        for i in range(-5, repeats):  # five warm-up rounds; the order rotates so none goes first always
            for which in np.roll([0, 1, 2], i):
                layout.flat.normal_()
                world.barrier()
                world.stall_timeout = Config.stall_timeout if which == 2 else 0.0
                t0 = world.wtime()
                world.raw_allreduce_(raw) if which == 1 else dense.aggregate(i)
                if i >= 0:
                    times[which, i] = world.wtime() - t0
        world.stall_timeout = 0.0
        trainer_s, raw_s, watched_s = (median_max(world, t) for t in times)
        rows.append({"model": model_name, "ranks": world.size, "bytes": layout.flat.numel() * 4,
                     "trainer_median_s": trainer_s, "raw_mpi4py_median_s": raw_s,
                     "speed_ratio": raw_s / trainer_s, "watched_median_s": watched_s,
                     "watched_speed_ratio": raw_s / watched_s})
    return rows


def run(world, args) -> dict:
    return {"allreduce": bench_allreduce(world, args.repeats)}
