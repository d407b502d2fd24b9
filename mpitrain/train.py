"""The training loop: batch, forward/backward, aggregate, optimizer step, log, checkpoint."""
from __future__ import annotations

import math
import os
import signal
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from . import checkpoint, compress, models
from .config import Config, UsageError
from .data import Dataset, ShardedBatches, batch_for, locate
from .layout import GradLayout
from .metrics import RunLog

# Where the loop is (for the abort message of an uncaught exception), and whether a signal
# asked it to stop. The handler only sets the flag; the ranks agree at the end of a step.
STATE = {"step": None, "stop_requested": False}
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
REQUEUE = 75  # EX_TEMPFAIL: "checkpointed, please requeue"


class TrainingStopped(Exception):
    """Every rank agreed to stop before the last step; `code` is the exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Run:
    cfg: Config
    dataset: Dataset
    batches: ShardedBatches
    model: torch.nn.Module
    layout: GradLayout
    compressor: compress.Compressor
    optimizer: torch.optim.Optimizer
    start_step: int = 0
    wire_bytes_total: int = 0  # carried across resumes, for plots against bytes
    batch_chosen: bool = False  # --batch-size 0: the per-rank batch was chosen from the data


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
    batch_chosen = cfg.batch_size == 0
    cfg.batch_size = batch_for(dataset.n_train, world.size, cfg.batch_size)  # config.json records the batch used
    batches = ShardedBatches(dataset, cfg.batch_size, world.rank, world.size, cfg.seed)
    compressor = compress.build(cfg, layout, world)
    if cfg.ef_resume == "mean" and not compressor.reshardable:
        raise UsageError(f"--ef-resume mean needs a linear compressor; {cfg.compressor} is not "
                         "(use gather or reset)")
    return Run(cfg, dataset, batches, model, layout, compressor, make_optimizer(cfg, model.parameters()),
               batch_chosen=batch_chosen)


def resume(run: Run, world):
    """Rank 0 picks the checkpoint --resume names and verifies it; every rank loads it.
    Without one, every rank starts from rank 0's initialisation."""
    path, error = None, None
    if world.rank == 0:
        try:
            path, notes = checkpoint.choose(run.cfg, run)
        except UsageError as e:
            error, notes = str(e), []
        for note in notes:
            print(f"mpitrain: {note}", flush=True)
    message = np.zeros(4097, dtype=np.uint8)  # [status, utf-8 text]: 0 fresh, 1 resume from path, 2 error
    if world.rank == 0:
        text = (error or str(path or "")).encode("utf-8", "backslashreplace")[:4096]
        message[0], message[1:1 + len(text)] = (2 if error else 1 if path else 0), np.frombuffer(text, np.uint8)
    usual = world.stall_timeout  # the other ranks wait while rank 0 checks files, each within its own deadline
    world.stall_timeout = usual and usual + checkpoint.check_budget(run.cfg)
    try:
        world.bcast_(message)
    finally:
        world.stall_timeout = usual
    text = message[1:].tobytes().rstrip(b"\0").decode("utf-8", "replace")
    if message[0] == 2:
        raise UsageError(text)
    if message[0] == 0:
        world.bcast_(run.layout.params_np)
        return
    attrs = checkpoint.load(checkpoint.Path(text), run, world)
    run.start_step, run.wire_bytes_total = int(attrs["step"]), int(attrs["wire_bytes_total"])
    if world.rank == 0:
        print(f"mpitrain: resumed from {text} at step {run.start_step}", flush=True)


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


def request_stop(signum, frame):
    STATE["stop_requested"] = True


def backward(run: Run, world, step: int):
    """This rank's gradient share, with the control words the exchange carries; a non-finite
    share is zeroed so nothing non-finite enters the exchange, and flagged instead."""
    x, y = run.batches.batch_at(step)
    run.layout.zero_grad()
    loss, _ = models.loss_and_metric(run.model(torch.from_numpy(x)), torch.from_numpy(y), run.dataset.info["task"])
    share = loss / world.size  # every gradient comes out as this rank's share of the global mean
    share.backward()
    finite = bool(torch.isfinite(share)) and bool(torch.isfinite(run.layout.grads.sum(dtype=torch.float64)))
    if not finite:
        run.layout.grads.zero_()
    run.layout.control.copy_(torch.tensor([float(share.detach()) if finite else 0.0, float(not finite),
                                           float(STATE["stop_requested"])]))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's state tensors in parameter order (the same order on every rank)."""
    return [state[key] for group in optimizer.param_groups for p in group["params"]
            for state in [optimizer.state.get(p, {})] for key in sorted(state) if isinstance(state[key], torch.Tensor)]


def check_sync(run: Run, world, step: int) -> int:
    """Compare every rank's checksum of parameters and optimizer state with rank 0's in one small
    Allreduce. A mismatch ends the job naming the ranks, or rank 0's state is broadcast (returns 1)."""
    sums = np.zeros(world.size, dtype=np.uint64)
    state = optimizer_tensors(run.optimizer)
    opt_crc = 0
    for tensor in state:
        opt_crc = zlib.crc32(tensor.contiguous().numpy(), opt_crc)
    sums[world.rank] = (zlib.crc32(run.layout.params_np) << 32) | opt_crc
    world.allreduce_(sums)
    differ = np.flatnonzero(sums != sums[0])
    if not differ.size:
        return 0
    ranks = ", ".join(map(str, differ))
    if run.cfg.on_divergence == "abort":
        raise TrainingStopped(1, f"sync check at step {step}: rank(s) {ranks} hold parameters or optimizer state "
                                 "that differ from rank 0's (--on-divergence abort); no checkpoint written")
    world.bcast_(run.layout.params_np)
    for tensor in state:  # state tensors are contiguous CPU tensors, so numpy() shares their memory
        world.bcast_(tensor.numpy())
    if world.rank == 0:
        print(f"mpitrain: sync check at step {step}: rank(s) {ranks} differed from rank 0; "
              "rank 0's parameters and optimizer state broadcast (--on-divergence rebroadcast)", flush=True)
    return 1


def train(run: Run, world) -> dict:
    cfg, layout, compressor, optimizer = run.cfg, run.layout, run.compressor, run.optimizer
    for sig in STOP_SIGNALS:
        signal.signal(sig, request_stop)
    evaluate, log = Evaluator(run, world), RunLog(cfg, world, cfg.steps)
    log.start(world.size, run.batches, run.batch_chosen)
    world.take_sent_bytes()
    wire_total, eval_bytes, skipped, rebroadcasts = run.wire_bytes_total, 0, 0, 0
    started = time.perf_counter()
    result = evaluate() if run.start_step >= cfg.steps else {}
    for step in range(run.start_step, cfg.steps):
        STATE["step"], done = step + 1, step + 1  # steps are numbered from 1 outside the loop
        world.where = f"step {done}"
        t0 = time.perf_counter()
        backward(run, world, step)
        compressor.aggregate(step)
        loss, nonfinite, stop = layout.control.tolist()  # summed over ranks by the exchange
        if nonfinite and cfg.nan_policy == "abort":
            raise TrainingStopped(1, f"non-finite gradients at step {done} (--nan-policy abort); no checkpoint written")
        skipped += bool(nonfinite)
        lr = lr_at(cfg, step)
        if not nonfinite:
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
        if cfg.sync_check_every and done % cfg.sync_check_every == 0:
            rebroadcasts += check_sync(run, world, done)
        wire = world.take_sent_bytes()
        wire_total += wire
        if done % cfg.log_every == 0 or done == cfg.steps or nonfinite or "contraction" in compressor.stats:
            log.train({"step": done, "loss": loss, "lr": lr, "wire_bytes": wire, "dense_bytes": layout.dense_bytes,
                       "step_time_s": time.perf_counter() - t0, "skipped_steps": skipped, "rebroadcasts": rebroadcasts,
                       **compressor.stats})
        if done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0):
            result = evaluate()
            eval_bytes += world.take_sent_bytes()
            log.eval({"step": done, **result, "wire_bytes_total": wire_total})
        if stop or done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            saved = checkpoint.save(run, world, done, wire_total)
            world.take_sent_bytes()  # checkpoint traffic is not gradient exchange
        if stop and done < cfg.steps:
            raise TrainingStopped(REQUEUE, f"stop requested by signal: checkpoint {saved} written after step "
                                           f"{done}; exit {REQUEUE} asks the job script to requeue")
    STATE["step"] = None
    steps_run = cfg.steps - run.start_step
    mean_wire = world.allreduce_(np.array([wire_total - run.wire_bytes_total], dtype=np.float64))[0] / world.size
    summary = {"steps": cfg.steps, "steps_run": steps_run, "world_size": world.size,
               "wall_time_s": time.perf_counter() - started, **result, "skipped_steps": skipped, "rebroadcasts": rebroadcasts,
               "wire_bytes_per_rank": mean_wire, "dense_bytes_per_rank": layout.dense_bytes * steps_run,
               "wire_bytes_eval_per_rank": eval_bytes, "run_dir": cfg.run_dir}
    log.summary(summary)
    return summary
