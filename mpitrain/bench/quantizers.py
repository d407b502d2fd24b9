"""The quantizers' two exchanges against dense, on the default job.

    python -m mpitrain bench quantizers --out bench              (no mpiexec) launches N = 4 and 16 itself
    mpiexec -n N python -m mpitrain bench quantizers --out bench one world size, the one launched

Every arm trains the default job (the digits MLP, the same seed, data order and steps): dense, and
sparse-dither and qsgd with --quantizer-exchange gather (every rank decodes every rank's payload)
and sharded (each rank decodes its share of every payload and the encoded sums of every share).
Per arm: the training loop's wall time (the slowest rank's) and its ratio to dense's in the same
run, the median step, the values each rank decodes a step (its ratio to d, the gradient's
values), the bytes each rank sends a step, and the final eval accuracy beside the gather arm's.
With --repeats R each arm trains min(R, 3) times (R defaults to 100, a count meant for the
micro-benchmarks), arms interleaved, and the medians are tabled.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

from .. import api
from ..config import Config
from .common import launch_each_size, launch_env, train_job, under_mpiexec

NAME = "quantizers"
ABOUT = "sparse-dither and qsgd, gather against sharded exchange, against dense: wall, decoded values, accuracy"
ARMS = ("dense", "sparse-dither-gather", "sparse-dither-sharded", "qsgd-gather", "qsgd-sharded")
SIZES = (4, 16)


def _config(arm: str, world, out: str, steps: int, repeat: int) -> Config:
    compressor, _, exchange = arm.rpartition("-") if arm != "dense" else ("dense", "", "gather")
    return dataclasses.replace(Config(), progress="never", log_every=1, resume="none", eval_every=0,
                               compressor=compressor, quantizer_exchange=exchange, steps=steps or Config.steps,
                               run_dir=os.path.join(out, NAME, f"n{world.size}-{arm}-{repeat}"))


def bench_quantizers(world, out: str, steps: int = 0, repeats: int = 1) -> list[dict]:
    found: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for repeat in range(repeats):
        for arm in ARMS:
            cfg = _config(arm, world, out, steps, repeat)
            api.set_threads(world, cfg.threads)
            lines, summary = train_job(world, cfg)
            train = [x for x in lines if x["kind"] == "train"]
            slowest = np.array([summary["wall_time_s"], np.median([x["step_time_s"] for x in train])])
            world.allreduce_(slowest, op="max")
            found[arm].append({"wall_s": float(slowest[0]), "median_step_ms": float(slowest[1]) * 1e3,
                               "decoded_values": train[-1].get("decoded_values", 0),
                               "sent_bytes": train[-1]["wire_bytes"], "numel": train[-1]["dense_bytes"] // 4,
                               "eval_accuracy": summary["eval_accuracy"]})
    rows = [{"ranks": world.size, "arm": arm, "steps": steps or Config.steps, "repeats": repeats,
             **{key: float(np.median([r[key] for r in runs])) for key in runs[0]}} for arm, runs in found.items()]
    by_arm = {row["arm"]: row for row in rows}
    for row in rows:  # ratios within this run
        row["wall_over_dense"] = row["wall_s"] / by_arm["dense"]["wall_s"]
        row["decoded_over_d"] = row.pop("decoded_values") / row["numel"]
        gather = by_arm.get(row["arm"].replace("-sharded", "-gather"))
        row["accuracy_minus_gather"] = row["eval_accuracy"] - gather["eval_accuracy"] if gather else 0.0
    return rows


def run(world, args) -> dict:
    repeats = min(args.repeats, 3)  # --repeats defaults to 100 for the micro-benchmarks; whole jobs take longer
    if world.size == 1 and not under_mpiexec():
        return {NAME: launch_each_size(NAME, SIZES, args.out, [args.out, str(args.steps), str(repeats)],
                                       launch_env())}
    return {NAME: bench_quantizers(world, args.out, args.steps, repeats)}


if __name__ == "__main__":
    world = api.init()
    found = bench_quantizers(world, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    if world.rank == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(found, fh)
