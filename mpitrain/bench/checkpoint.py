"""A ~100 MB checkpoint's write and load against raw file I/O, and the stall it costs."""
from __future__ import annotations

import dataclasses
import itertools
import os
import time

import numpy as np

from .. import checkpoint, models, schema, train
from ..config import Config
from .common import fresh_run_dir, timed

NAME = "checkpoint"
ABOUT = "a ~100 MB checkpoint: write, load and verify against raw I/O; the stall in steps"


def bench_checkpoint(world, out: str, repeats: int) -> list[dict]:
    cfg = dataclasses.replace(Config(), model="mpitrain.bench.checkpoint:mlp_100mb", compressor="greedylore",
                              steps=10 ** 6, start_compress_step=0, run_dir=os.path.join(out, "checkpoint-run"),
                              resume="none",
                              keep_last=1, progress="never")
    fresh_run_dir(world, cfg.run_dir)
    run = train.prepare(cfg, world)
    train.resume(run, world)
    steps_run = itertools.count()

    def step():  # numbered on: an exchange overlapped with backward expects consecutive steps
        i = next(steps_run)
        train.backward(run, i)
        run.exchange.average(i)
        run.optimizer.step()
    for _ in range(3):  # untimed: the first is a dense refresh (an SVD), the next may compile kernels
        step()
    step_s = timed(step, 5)
    nbytes = 4 * run.layout.numel
    saved, contents = [], checkpoint.Contents(run.cfg, run.model, run.optimizer, run.compressor, run.layout)
    save_s = timed(lambda: saved.append(checkpoint.save(contents, world, len(saved) + 1)), repeats)
    # in the background: training goes on while rank 0's thread writes; what it loses is the snapshot
    # plus whatever the steps run during the write take beyond their usual time
    stalls, lost, writes = [], [], []
    for _ in range(repeats):
        world.barrier()
        t0 = time.perf_counter()
        saved.append(checkpoint.save(contents, world, len(saved) + 1, background=True))
        stalls.append(time.perf_counter() - t0)
        steps = 0
        while world.allreduce_(np.array([checkpoint.WRITER.busy()], dtype=np.int64))[0]:
            step()
            steps += 1
        checkpoint.WRITER.wait()
        writes.append(time.perf_counter() - t0)
        lost.append(writes[-1] - steps * step_s)
    stall_s, lost_s, background_write_s = (float(np.median(x)) for x in (stalls, lost, writes))
    path = saved[-1]
    size = os.path.getsize(path) if world.rank == 0 else 0
    raw = os.path.join(out, "raw.bin")
    blob = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)  # the checkpoint's byte count

    def raw_write():
        with open(raw, "wb") as fh:
            fh.write(blob.tobytes())
            fh.flush()
            os.fsync(fh.fileno())
    raw_write_s = timed(raw_write, repeats)
    read_s = timed(lambda: checkpoint.load(path, contents, world), repeats)
    verify_s = timed(lambda: schema.check(path), repeats) if world.rank == 0 else 0.0  # in process: uncached
    raw_read_s = timed(lambda: np.fromfile(raw, dtype=np.uint8), repeats)
    return [{"params": run.layout.numel, "model_mb": nbytes / 1e6, "file_mb": size / 1e6,
             "save_s": save_s, "raw_write_s": raw_write_s, "write_ratio": raw_write_s / save_s,
             "save_mb_per_s": size / 1e6 / save_s, "load_s": read_s, "verify_s": verify_s, "raw_read_s": raw_read_s,
             "read_ratio": raw_read_s / read_s, "step_s": step_s, "stall_steps": save_s / step_s,
             "background_snapshot_s": stall_s, "background_write_s": background_write_s,
             "background_lost_s": lost_s, "background_stall_steps": lost_s / step_s}]


def mlp_100mb(info):
    """25M parameters (100 MB of fp32 weights) for the checkpoint benchmark."""
    return models.mlp(info, hidden=(4900, 4900))


def run(world, args) -> dict:
    return {"checkpoint": bench_checkpoint(world, args.out, min(args.repeats, 3))}
