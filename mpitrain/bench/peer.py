"""The same job through torch DDP (gloo) with and without PowerSGD's hook, against our exchange.

    python -m mpitrain bench peer --out bench              (no mpiexec) launches N = 2 and 4 itself
    mpiexec -n N python -m mpitrain bench peer --out bench one world size, the one launched

Every arm trains the default job (the digits MLP, SGD with momentum, the same seed, data order,
batch, learning-rate schedule and steps) and reports the median step time (forward, backward,
exchange, optimizer step; the first WARM steps left out) and the final eval accuracy at equal
steps. Torch's arms run torch.distributed on gloo from the same mpiexec launch: the ranks agree on a
TCP rendezvous over MPI first. PowerSGD on both sides: rank 4, error feedback, warm start,
compression from step 10.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import struct
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

from .. import api, models, train
from ..config import Config
from ..data import ShardedBatches, batch_for, open_dataset
from .common import launch_each_size, launch_env, train_job, under_mpiexec

NAME = "peer"
ABOUT = "torch DDP (gloo) +/- powerSGD_hook against our dense, powersgd and greedylore: step time, accuracy"
ARMS = ("ddp-dense", "ddp-powersgd", "dense", "powersgd", "greedylore")
SIZES = (2, 4)
WARM = 20  # steps left out of the median (first-touch allocations, PowerSGD's dense start)


def _address() -> str:
    """Where other ranks reach this one: the address of gloo's interface when one is named (an emulated
    cluster's eth0: its namespaces share a hostname that resolves to the loopback), else the hostname."""
    name = os.environ.get("GLOO_SOCKET_IFNAME")
    if not name:
        return socket.gethostname()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # SIOCGIFADDR: the interface's IPv4 address
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
    return socket.inet_ntoa(packed[20:24])


def _rendezvous(world) -> str:
    """A free TCP port on rank 0's host, told to every rank over MPI."""
    message = np.zeros(256, dtype=np.uint8)
    if world.rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            text = f"tcp://{_address()}:{s.getsockname()[1]}".encode()
        message[:len(text)] = np.frombuffer(text, np.uint8)
    world.bcast_(message)
    return message.tobytes().rstrip(b"\0").decode()


def ddp(world, module, backend: str, powersgd_rank: int = 0, start: int = 0, device_ids=None):
    """`module` under torch DDP on `backend` (the process group started once per job, never destroyed:
    a rank stuck tearing it down hangs the job), with PowerSGD's hook at `powersgd_rank` from step
    `start` when given (error feedback, warm start)."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=_rendezvous(world), rank=world.rank, world_size=world.size)
    # PowerSGD's hook on gloo hung with two buckets (each bucket's callback waits on its own all_reduce,
    # in another order on each rank): its arm exchanges one bucket, after backward
    size_mb = sum(p.numel() for p in module.parameters()) * 4 / 2**20
    model = DistributedDataParallel(module, device_ids=device_ids,
                                    **({"bucket_cap_mb": 2 * size_mb + 1} if powersgd_rank else {}))
    if powersgd_rank:
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank,
                                            start_powerSGD_iter=start, use_error_feedback=True, warm_start=True)
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return model


def ddp_train(world, cfg: Config, powersgd: bool) -> list[dict]:
    """The job through torch DDP on gloo (with PowerSGD's hook when asked), evaluated as our loop is,
    every cfg.eval_every steps and at the end: its train lines (step times) and eval lines."""
    import torch.distributed as dist

    dataset = open_dataset(cfg.dataset, cfg.data_dir)
    torch.manual_seed(cfg.seed)  # the same initial weights as our arms (rank 0's, broadcast by DDP)
    module = models.build(cfg.model, dataset.info)
    model = ddp(world, module, "gloo", cfg.rank if powersgd else 0, cfg.start_compress_step)
    optimizer = train.make_optimizer(cfg, model.parameters())
    batches = ShardedBatches(dataset, batch_for(dataset.n_train, world.size, cfg.batch_size), world.rank,
                             world.size, cfg.seed)
    evaluate = train.Evaluator(SimpleNamespace(model=model.module, dataset=dataset), world)
    lines = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        x, y = batches.batch_at(step)
        optimizer.zero_grad()
        loss, _ = models.loss_and_metric(model(torch.from_numpy(x)), torch.from_numpy(y), dataset.info["task"])
        loss.backward()  # DDP averages the gradients (through the hook) during backward
        for group in optimizer.param_groups:
            group["lr"] = train.lr_at(cfg, step)
        optimizer.step()
        lines.append({"kind": "train", "step": step + 1, "step_time_s": time.perf_counter() - t0})
        if step + 1 == cfg.steps or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            lines.append({"kind": "eval", "step": step + 1, **evaluate()})
    dist.barrier()  # every rank done with gloo before any goes back to MPI
    return lines


def bench_peer(world, out: str, steps: int = 0) -> list[dict]:
    rows = []
    for arm in ARMS:
        cfg = dataclasses.replace(Config(), progress="never", log_every=1, resume="none", eval_every=0,
                                  compressor=arm if arm in ("powersgd", "greedylore") else "dense",
                                  run_dir=os.path.join(out, "peer", f"n{world.size}-{arm}"),
                                  steps=steps or Config.steps)
        api.set_threads(world, cfg.threads)
        t0 = time.perf_counter()
        if arm.startswith("ddp"):
            lines = ddp_train(world, cfg, arm == "ddp-powersgd")
            times, accuracy = [x["step_time_s"] for x in lines if x["kind"] == "train"], lines[-1]["eval_accuracy"]
        else:
            lines, summary = train_job(world, cfg)
            times, accuracy = [x["step_time_s"] for x in lines if x["kind"] == "train"], summary["eval_accuracy"]
        wall = time.perf_counter() - t0
        step = np.array([np.median(times[WARM:])])
        world.allreduce_(step, op="max")
        rows.append({"ranks": world.size, "arm": arm, "steps": cfg.steps, "median_step_ms": float(step[0]) * 1e3,
                     "eval_accuracy": accuracy, "wall_s": wall})
    for row in rows:  # ratios within this run
        peer = "ddp-dense" if row["arm"] in ("ddp-dense", "dense") else "ddp-powersgd"
        ddp = next(r for r in rows if r["arm"] == peer)
        row["ddp_step_over_this"] = ddp["median_step_ms"] / row["median_step_ms"]
    return rows


def run(world, args) -> dict:
    if world.size == 1 and not under_mpiexec():
        return {"peer": launch_each_size(NAME, SIZES, args.out, [args.out, str(args.steps)], launch_env())}
    return {"peer": bench_peer(world, args.out, args.steps)}


if __name__ == "__main__":
    world = api.init()
    found = bench_peer(world, sys.argv[2], int(sys.argv[3]))
    if world.rank == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(found, fh)
