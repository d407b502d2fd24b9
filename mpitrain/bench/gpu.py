"""The GPU check: a 125M transformer's step, phase by phase, for our arms and torch DDP with
PowerSGD's hook, at 1 rank and at 2 ranks sharing the device; and the CUDA tests.

    python -m mpitrain bench gpu --out bench     (no mpiexec) launches 1 and 2 ranks itself
    mpiexec -n N python -m mpitrain bench gpu    one world size, the one launched

Each arm: forward+backward (bf16 autocast on a GPU; the gradients stay fp32), our exchange
(`Exchange.average`: compression, the collectives staged through the host, reconstruction) and
the optimizer step, each timed with the device synchronised, median over --steps after WARM.
At one rank the exchange is the compressor's own cost (its collectives sum one rank). DDP's arms
run its exchange inside backward: NCCL at one rank (where the hook still compresses), gloo at two
(NCCL refuses two ranks on one device). Without CUDA the same runs on a small transformer on the
CPU: a check of this code, not a figure.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import api, models
from ..device import choose, describe
from .common import launch_each_size, launch_env, under_mpiexec
from .compress import LM_125M
from . import peer

NAME = "gpu"
ABOUT = ("125M transformer on the GPU: forward+backward, exchange and step per arm beside DDP + powerSGD_hook; "
         "CUDA tests")
SMALL_LM = {"vocab_size": 256, "seq_len": 64, "d": 128, "layers": 2, "heads": 4, "ffn": 512}  # the CPU's dry run
ARMS = ("dense", "powersgd-r4", "powersgd-r8", "greedylore-r4", "greedylore-r8", "ddp-dense", "ddp-powersgd-r4")
SIZES = (1, 2)
WARM = 3  # steps left out: allocations, the dense steps before compression, greedylore's first basis
BATCH = 8  # sequences per rank


def _arm(arm: str) -> tuple[str, int]:
    """(compressor, rank) of an arm name such as greedylore-r4."""
    name, _, rank = arm.removeprefix("ddp-").partition("-r")
    return name, int(rank or 4)


class Clock:
    """Phase times of one step, each ended with the device synchronised."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.times: dict[str, list[float]] = {}

    def __call__(self, phase: str, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        self.times.setdefault(phase, []).append(time.perf_counter() - t0)
        return out

    def median_ms(self, phase: str, world) -> float:
        times = np.array([np.median(self.times[phase][WARM:])])
        world.allreduce_(times, op="max")  # a collective is as slow as its slowest rank
        return float(times[0]) * 1e3


def _model(device: torch.device):
    torch.manual_seed(0)
    config = LM_125M if device.type == "cuda" else SMALL_LM
    return models.TransformerLM(**config).to(device), config


def _batch(config: dict, device: torch.device, step: int, rank: int):
    g = torch.Generator().manual_seed(step * 1000 + rank)
    x = torch.randint(0, config["vocab_size"], (BATCH, config["seq_len"]), generator=g)
    return x.to(device), torch.roll(x, -1, 1).to(device)


def _forward(model, x, y, device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return models.loss_and_metric(model(x), y, "lm")[0]


def ours(world, arm: str, steps: int, device: torch.device) -> dict:
    model, config = _model(device)
    compressor, rank = _arm(arm)
    exchange = api.Exchange(model, world, compressor, rank=rank, device=device.type, kernels="torch",
                            start_compress_step=1, bucket_mb=0.0, progress="never")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    clock = Clock(exchange.device)
    for step in range(steps + WARM):
        x, y = _batch(config, device, step, world.rank)
        exchange.zero_grad()
        clock("forward_backward_ms", lambda: exchange.backward(_forward(model, x, y, device)))
        clock("exchange_ms", lambda: exchange.average(step))
        clock("optimizer_ms", optimizer.step)
        clock.times.setdefault("step_ms", []).append(sum(clock.times[p][-1] for p in
                                                         ("forward_backward_ms", "exchange_ms", "optimizer_ms")))
    return {phase: clock.median_ms(phase, world) for phase in clock.times}


def ddp(world, arm: str, steps: int, device: torch.device) -> dict:
    """The same step through torch DDP: its exchange runs inside backward, so only the step is timed
    whole, with forward+backward and the optimizer step apart for comparison."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" and world.size == 1 else "gloo"
    module, config = _model(device)
    model = peer.ddp(world, module, backend, 0 if arm == "ddp-dense" else _arm(arm)[1], start=2,
                     device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    clock = Clock(device)
    for step in range(steps + WARM):
        x, y = _batch(config, device, step, world.rank)
        optimizer.zero_grad()
        clock("forward_backward_ms", lambda: _forward(model, x, y, device).backward())
        clock("optimizer_ms", optimizer.step)
        clock.times.setdefault("step_ms", []).append(clock.times["forward_backward_ms"][-1]
                                                     + clock.times["optimizer_ms"][-1])
    dist.barrier()  # every rank done with torch.distributed before any goes back to MPI
    return {**{phase: clock.median_ms(phase, world) for phase in clock.times}, "backend": backend}


def bench_gpu(world, steps: int) -> list[dict]:
    device = choose("auto", world.local_rank)
    rows = []
    for arm in ARMS:
        row = (ddp if arm.startswith("ddp") else ours)(world, arm, steps, device)
        model = "transformer-125m" if device.type == "cuda" else "transformer-small (CPU dry run)"
        rows.append({"ranks": world.size, "arm": arm, "device": describe(device), "model": model, **row})
    fwd_bwd = next(r for r in rows if r["arm"] == "dense")["forward_backward_ms"]
    for row in rows:  # ratios within this run
        if "exchange_ms" in row:
            row["exchange_over_forward_backward"] = row["exchange_ms"] / fwd_bwd
        peer = "ddp-powersgd-r4" if row["arm"].startswith(("powersgd", "greedylore")) else "ddp-dense"
        row["step_over_ddp"] = row["step_ms"] / next(r for r in rows if r["arm"] == peer)["step_ms"]
    return rows


def cuda_tests() -> list[dict]:
    """The CUDA-marked tests of a source checkout (tests/ beside the package), when there is one."""
    tests = Path(__file__).resolve().parents[2] / "tests" / "test_device.py"
    if not tests.exists():
        return [{"tests": "tests/test_device.py", "result": "not run: no source checkout here"}]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "--full", str(tests)], capture_output=True,
                          text=True, timeout=900, cwd=tests.parents[1])
    last = (done.stdout.strip().splitlines() or ["no output"])[-1]
    return [{"tests": "tests/test_device.py", "result": last, "exit": done.returncode,
             "seconds": round(time.perf_counter() - t0, 1)}]


def run(world, args) -> dict:
    steps = args.steps or 10
    if world.size == 1 and not under_mpiexec():
        env = launch_env()
        env.pop("OMP_NUM_THREADS", None)  # a GPU rank's host threads: torch's own choice
        return {"gpu": launch_each_size(NAME, SIZES, args.out, [str(steps)], env), "tests": cuda_tests()}
    return {"gpu": bench_gpu(world, steps)}


if __name__ == "__main__":
    world = api.init()
    found = bench_gpu(world, int(sys.argv[2]))
    if world.rank == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(found, fh)
