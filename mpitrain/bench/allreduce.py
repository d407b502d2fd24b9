"""The trainer's dense aggregation against a bare mpi4py Allreduce of the same bytes."""
from __future__ import annotations

import numpy as np

from .. import compress
from ..config import Config
from .common import DEFAULT_MODELS, layout_of, median_max

NAME = "allreduce"
ABOUT = ("the trainer's dense exchange (blocking and watched) against a bare mpi4py Allreduce, and on "
         "several nodes a two-level one")


def bench_allreduce(world, repeats: int) -> list[dict]:
    rows = []
    for model_name, dataset in DEFAULT_MODELS:
        layout = layout_of(model_name, dataset)
        cfg = Config(model=model_name, dataset=dataset, compressor="dense")
        dense = compress.build(cfg, layout, world)
        raw = layout.flat_np  # the very same memory: only the code path differs
        # the trainer's path blocking, bare mpi4py, the trainer's path watched, and on several nodes
        # of several ranks the bare two-level sum (node reduce-scatter, network Allreduce, node allgather)
        arms = [0, 1, 2, 3] if two_levels(world) else [0, 1, 2]
        calls = (dense.aggregate, lambda _: world.raw_allreduce_(raw), dense.aggregate,
                 lambda _: world.two_level_allreduce_(raw))
        times = np.zeros((4, repeats))
        for i in range(-5, repeats):  # five warm-up rounds; the order rotates so none goes first always
            for which in np.roll(arms, i):
                layout.flat.normal_()
                world.barrier()
                world.stall_timeout = Config.stall_timeout if which == 2 else 0.0
                t0 = world.wtime()
                calls[which](i)
                if i >= 0:
                    times[which, i] = world.wtime() - t0
        world.stall_timeout = 0.0
        trainer_s, raw_s, watched_s, two_level_s = (median_max(world, t) for t in times)
        rows.append({"model": model_name, "ranks": world.size, "bytes": layout.flat.numel() * 4,
                     "trainer_median_s": trainer_s, "raw_mpi4py_median_s": raw_s,
                     "speed_ratio": raw_s / trainer_s, "watched_median_s": watched_s,
                     "watched_speed_ratio": raw_s / watched_s,
                     **({"nodes": world.size // world.local_size, "two_level_median_s": two_level_s,
                         "two_level_over_raw": two_level_s / raw_s} if len(arms) == 4 else {})})
    return rows


def two_levels(world) -> bool:
    """Several nodes, each of the same number (> 1) of ranks (a collective)."""
    sizes = np.array([world.local_size, -world.local_size], dtype=np.int64)
    world.allreduce_(sizes, op="max")
    return 1 < world.local_size < world.size and sizes[0] == -sizes[1]


def run(world, args) -> dict:
    return {"allreduce": bench_allreduce(world, args.repeats)}
