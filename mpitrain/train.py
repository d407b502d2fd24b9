"""The training loop: batch, forward/backward, aggregate, optimizer step, log."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import compress, models
from .config import Config, UsageError
from .data import Dataset, ShardedBatches, locate
from .layout import GradLayout
from .metrics import RunLog

# Where the loop is, for the abort message of an uncaught exception.
STATE = {"step": None}


@dataclass
class Run:
    cfg: Config
    dataset: Dataset
    batches: ShardedBatches
    model: torch.nn.Module
    layout: GradLayout
    compressor: compress.Compressor
    optimizer: torch.optim.Optimizer


def set_threads(cfg: Config, world) -> int:
    """One rank's share of the node's cores (oversubscribed threads make steps 30x slower)."""
    n = cfg.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if not n:
        bound = len(os.sched_getaffinity(0))
        n = bound if bound < (os.cpu_count() or bound) else max(1, bound // world.local_size)
    torch.set_num_threads(n)
    return n


def prepare(cfg: Config, world) -> Run:
    """Everything that can fail on a user's mistake; makes no collective call."""
    dataset = Dataset(locate(cfg.dataset, cfg.data_dir))
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, dataset.info)
    try:
        layout = GradLayout(model)
    except ValueError as e:
        raise UsageError(f"model {cfg.model}: {e}") from None
    batches = ShardedBatches(dataset, cfg.batch_size, world.rank, world.size, cfg.seed)
    return Run(cfg, dataset, batches, model, layout, compress.build(cfg, layout, world),
               make_optimizer(cfg, model.parameters()))


def make_optimizer(cfg: Config, params):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(cfg: Config, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


class Evaluator:
    """The held-out split, sharded over ranks, read once; metrics summed with one Allreduce."""

    def __init__(self, run: Run, world, batch: int = 256):
        self.world, self.model, self.task = world, run.model, run.dataset.info["task"]
        self.x, self.y = run.dataset.rows("test", np.arange(world.rank, run.dataset.n_test, world.size))
        self.batch = batch

    def __call__(self) -> dict:
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, metric sum, count
        with torch.no_grad():
            for i in range(0, len(self.x), self.batch):
                y = torch.from_numpy(self.y[i:i + self.batch])
                loss, metric = models.loss_and_metric(self.model(torch.from_numpy(self.x[i:i + self.batch])), y,
                                                      self.task)
                totals += torch.tensor([float(loss) * y.numel(), float(metric), y.numel()], dtype=torch.float64)
        self.world.allreduce_(totals.numpy())
        loss = float(totals[0] / totals[2])
        if self.task == "lm":
            return {"eval_loss": loss, "eval_bpc": loss / math.log(2)}
        return {"eval_loss": loss, "eval_accuracy": float(totals[1] / totals[2])}


def train(run: Run, world) -> dict:
    cfg, layout, model, compressor, optimizer = run.cfg, run.layout, run.model, run.compressor, run.optimizer
    evaluate = Evaluator(run, world)
    log = RunLog(cfg, world, cfg.steps)
    world.bcast_(layout.params_np)  # every rank starts from rank 0's initialisation
    world.take_sent_bytes()
    wire_total, eval_bytes, started = 0, 0, time.perf_counter()
    for step in range(cfg.steps):
        STATE["step"] = step + 1  # steps are numbered from 1 outside the loop
        t0 = time.perf_counter()
        x, y = run.batches.batch_at(step)
        layout.zero_grad()
        loss, _ = models.loss_and_metric(model(torch.from_numpy(x)), torch.from_numpy(y), run.dataset.info["task"])
        share = loss / world.size  # every gradient comes out as this rank's share of the global mean
        share.backward()
        layout.control[0] = share.detach()
        compressor.aggregate(step)
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        wire = world.take_sent_bytes()
        wire_total += wire
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or "contraction" in compressor.stats:
            log.train({"step": step + 1, "loss": float(layout.control[0]), "lr": lr, "wire_bytes": wire,
                       "dense_bytes": layout.dense_bytes, "step_time_s": time.perf_counter() - t0,
                       **compressor.stats})
        if step + 1 == cfg.steps or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            result = evaluate()
            eval_bytes += world.take_sent_bytes()
            log.eval({"step": step + 1, **result})
    STATE["step"] = None
    wall = time.perf_counter() - started
    mean_wire = world.allreduce_(np.array([wire_total], dtype=np.float64))[0] / world.size
    summary = {"steps": cfg.steps, "world_size": world.size, "wall_time_s": wall, **result,
               "wire_bytes_per_rank": mean_wire, "dense_bytes_per_rank": layout.dense_bytes * cfg.steps,
               "wire_bytes_eval_per_rank": eval_bytes, "run_dir": cfg.run_dir}
    log.summary(summary)
    return summary
