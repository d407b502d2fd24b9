"""The training loop the command runs, written against the public API (api.py)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import api, device, models, optim
from .config import Config, UsageError
from .data import ShardedBatches, batch_for, check_isolated, open_dataset
from .metrics import RunLog, check_folder, require_tensorboard

REQUEUE = 75  # EX_TEMPFAIL: "checkpointed, please requeue"


class TrainingStopped(Exception):
    """Every rank agreed to stop before the last step; `code` is the exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Run:
    cfg: Config
    dataset: object  # data.Dataset, ArrayData or TorchData
    batches: ShardedBatches
    model: torch.nn.Module
    exchange: api.Exchange
    optimizer: optim.Optimizer
    start_step: int = 0
    wire_bytes_total: int = 0  # carried across resumes, for plots against bytes
    batch_chosen: bool = False  # --batch-size 0: the per-rank batch was chosen from the data

    @property
    def layout(self):
        return self.exchange.layout

    @property
    def compressor(self):
        return self.exchange.compressor


def set_threads(cfg: Config, world) -> int:
    return api.set_threads(world, cfg.threads)


def prepare(cfg: Config, world) -> Run:
    """Everything that can fail on a user's mistake; its one collective call is node-local (the
    ranks of a node share one check of a data file: many ranks on few cores each checking it took seconds)."""
    check_folder(cfg.run_dir)
    if cfg.tensorboard:
        require_tensorboard()
    dataset = open_dataset(cfg.dataset, cfg.data_dir, check=lambda path: world.node_first(lambda: check_isolated(path)))
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, dataset.info)
    batch_chosen = cfg.batch_size == 0
    cfg.batch_size = batch_for(dataset.n_train, world.size * cfg.accumulate, cfg.batch_size)  # recorded as used
    # a step's K micro-batches are the rows one batch K times as large would hold: the same samples, the same order
    batches = ShardedBatches(dataset, cfg.batch_size * cfg.accumulate, world.rank, world.size, cfg.seed)
    exchange = api.Exchange(model, world, cfg.compressor, cfg=cfg)
    if cfg.ef_resume == "mean" and not exchange.compressor.reshardable:
        raise UsageError(f"--ef-resume mean needs a linear compressor; {cfg.compressor} is not "
                         "(use gather or reset)")
    return Run(cfg, dataset, batches, model, exchange, make_optimizer(cfg, model.parameters()),
               batch_chosen=batch_chosen)


def resume(run: Run, world):
    """The checkpoint --resume names, checked by rank 0 and loaded by every rank; without one,
    every rank starts from rank 0's initialisation."""
    resumed = api.load_checkpoint(run.exchange, run.optimizer, run.cfg.resume, run.cfg.run_dir)
    if resumed:
        run.start_step, run.wire_bytes_total = resumed.step, resumed.wire_bytes_total


def make_optimizer(cfg: Config, params) -> optim.Optimizer:
    """torch.optim's update in mpitrain's own classes (optim.py says why: a rank starts faster)."""
    if cfg.optimizer == "sgd":
        return optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = optim.Adam if cfg.optimizer == "adam" else optim.AdamW
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
        self.device = next(run.model.parameters()).device
        self.x, self.y = run.dataset.rows("test", np.arange(world.rank, run.dataset.n_test, world.size))
        self.batch = batch

    def __call__(self) -> dict:
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, metric sum, count
        with torch.no_grad():
            for i in range(0, len(self.x), self.batch):
                x, y = (torch.from_numpy(a[i:i + self.batch]).to(self.device) for a in (self.x, self.y))
                loss, metric = models.loss_and_metric(self.model(x), y, self.task)
                totals += torch.tensor([float(loss) * y.numel(), float(metric), y.numel()], dtype=torch.float64)
        self.world.allreduce_(totals.numpy())
        loss = float(totals[0] / totals[2])
        if self.task == "lm":
            return {"eval_loss": loss, "eval_bpc": loss / math.log(2)}
        return {"eval_loss": loss, "eval_accuracy": float(totals[1] / totals[2])}


def backward(run: Run, step: int):
    """This rank's share of the step's gradient, micro-batch by micro-batch (the control words ride
    on the exchange)."""
    x, y = (torch.from_numpy(a).to(run.exchange.device, non_blocking=True) for a in run.batches.batch_at(step))
    run.exchange.zero_grad()
    micro = run.cfg.batch_size
    for at in range(0, len(x), micro):
        loss, _ = models.loss_and_metric(run.model(x[at:at + micro]), y[at:at + micro], run.dataset.info["task"])
        run.exchange.backward(loss)


def train(run: Run, world) -> dict:
    cfg, exchange, optimizer = run.cfg, run.exchange, run.optimizer
    evaluate, log = Evaluator(run, world), RunLog(cfg, world, cfg.steps)
    log.start(world.size, run.batches, run.batch_chosen, run.start_step, world.node_names(),
              world.gather_text(device.describe(exchange.device)), exchange.compressor.two_level)
    world.take_sent_bytes()
    wire_total, eval_bytes, skipped, skipped_rounds, rebroadcasts = run.wire_bytes_total, 0, 0, 0, 0
    started = time.perf_counter()
    with exchange.agreed_parameters():
        result = evaluate() if run.start_step >= cfg.steps else {}
    for step in range(run.start_step, cfg.steps):
        done = step + 1  # steps are numbered from 1 outside the loop
        world.where = f"step {done}"
        t0 = time.perf_counter()
        backward(run, step)
        exchanging = time.perf_counter()
        averaged = exchange.average(step)
        exchange_s = time.perf_counter() - exchanging
        if averaged.nonfinite and cfg.nan_policy == "abort":
            raise TrainingStopped(1, f"non-finite gradients at step {done} (--nan-policy abort); no checkpoint written")
        skipped += averaged.nonfinite
        if "compressor_choice" in averaged.stats:
            log.choice(averaged.stats.pop("compressor_choice"))
        lr = lr_at(cfg, step)
        if not averaged.nonfinite:
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
        rounded = exchange.average_parameters(step, last=done == cfg.steps)
        if rounded:
            if rounded.nonfinite and cfg.nan_policy == "abort":
                raise TrainingStopped(1, f"non-finite parameter delta at step {done} (--nan-policy abort); "
                                         "no checkpoint written")
            skipped_rounds += rounded.nonfinite
            log.round({"step": done, "round": rounded.index, "wire_bytes": rounded.wire_bytes,
                       "dense_bytes": exchange.layout.dense_bytes, "skipped_rounds": skipped_rounds, **rounded.stats})
        if cfg.sync_check_every and done % cfg.sync_check_every == 0:
            try:
                rebroadcasts += exchange.check_sync(optimizer, done)
            except api.Diverged as e:
                raise TrainingStopped(1, str(e)) from None
        wire = world.take_sent_bytes()
        wire_total += wire
        if done % cfg.log_every == 0 or done == cfg.steps or averaged.nonfinite or "contraction" in averaged.stats:
            log.train({"step": done, "loss": averaged.loss, "skipped": averaged.nonfinite, "lr": lr,
                       "wire_bytes": wire, "dense_bytes": exchange.layout.dense_bytes,
                       "step_time_s": time.perf_counter() - t0, "exchange_s": exchange_s,
                       **({} if averaged.grad_norm is None else {"grad_norm": averaged.grad_norm}),
                       "elapsed_s": time.perf_counter() - started, "wire_bytes_total": wire_total,
                       "skipped_steps": skipped, "rebroadcasts": rebroadcasts, **averaged.stats})
        if done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0):
            with exchange.agreed_parameters():
                result = evaluate()
            eval_bytes += world.take_sent_bytes()
            log.eval({"step": done, **result, "elapsed_s": time.perf_counter() - started,
                      "wire_bytes_total": wire_total})
        if averaged.stop or done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            saved = api.save_checkpoint(cfg.run_dir, done, exchange, optimizer, epoch=run.batches.epoch_of(done),
                                        wire_bytes_total=wire_total)
            world.take_sent_bytes()  # checkpoint traffic is not gradient exchange
        if averaged.stop and done < cfg.steps:
            api.wait_for_checkpoints()
            raise TrainingStopped(REQUEUE, f"stop requested by signal: checkpoint {saved} written after step "
                                           f"{done}; exit {REQUEUE} asks the job script to requeue")
    api.wait_for_checkpoints()
    steps_run = max(0, cfg.steps - run.start_step)  # none when the checkpoint is at or past --steps
    mean_wire = world.allreduce_(np.array([wire_total - run.wire_bytes_total], dtype=np.float64))[0] / world.size
    summary = {"steps": cfg.steps, "steps_run": steps_run, "world_size": world.size,
               "wall_time_s": time.perf_counter() - started, **result, "skipped_steps": skipped,
               "skipped_rounds": skipped_rounds, "rebroadcasts": rebroadcasts,
               "wire_bytes_per_rank": mean_wire, "dense_bytes_per_rank": exchange.layout.dense_bytes * steps_run,
               "wire_bytes_eval_per_rank": eval_bytes, "run_dir": cfg.run_dir}
    log.summary(summary)
    return summary
