"""What the stall watchdog and the sync check cost on the default job."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from .. import train
from ..config import Config
from .common import fresh_run_dir

NAME = "guard"
ABOUT = "stall watchdog and sync check overhead on the default job (median of --repeats, max 25)"


GUARD_ARMS = {"off": {"stall_timeout": 0.0, "sync_check_every": 0},
              "watchdog": {"sync_check_every": 0},
              "watchdog+sync-check (defaults)": {},
              "sync-check every step": {"sync_check_every": 1}}


def bench_guard(world, out: str, repeats: int) -> list[dict]:
    """What the stall watchdog and the sync check cost on the default job: every arm `repeats`
    times, interleaved so that drifts in machine load fall on every arm alike; medians compared."""
    times, settings = {arm: [] for arm in GUARD_ARMS}, {}
    for i in range(repeats):
        for arm, overrides in GUARD_ARMS.items():
            cfg = dataclasses.replace(Config(), progress="never", log_every=10**9, resume="none",
                                      run_dir=os.path.join(out, "guard", f"{i}-{arm.split()[0]}"), **overrides)
            world.stall_timeout, settings[arm] = cfg.stall_timeout, (cfg.stall_timeout, cfg.sync_check_every)
            fresh_run_dir(world, cfg.run_dir)
            run = train.prepare(cfg, world)
            train.resume(run, world)
            times[arm].append(train.train(run, world)["wall_time_s"])
    world.stall_timeout = 0.0
    base = float(np.median(times["off"]))
    return [{"arm": arm, "stall_timeout_s": settings[arm][0], "sync_check_every": settings[arm][1],
             "median_wall_s": float(np.median(t)), "overhead_vs_off": float(np.median(t)) / base - 1,
             "runs": len(t)} for arm, t in times.items()]


def run(world, args) -> dict:
    return {"guard": bench_guard(world, args.out, min(args.repeats, 25))}
