"""What rank 0 writes about a run: config.json, metrics.jsonl, TensorBoard events (--tensorboard),
and a tqdm progress bar on a terminal or plain lines otherwise.

metrics.jsonl holds one JSON object per line, each with a `kind`:
  train    step (steps completed), loss (mean over ranks; 0.0 on a skipped step), skipped (this step's
           loss or gradients were non-finite on some rank: no optimizer step), lr, wire_bytes, dense_bytes,
           step_time_s, exchange_s (of it, the time spent in the exchange after backward), elapsed_s (since this run started), wire_bytes_total, skipped_steps (so far),
           rebroadcasts, + compressor stats (with --hierarchy node: network_bytes and node_bytes, this
           rank's wire_bytes split by where they travel, and node_network_bytes, its node's ranks' summed)
  eval     step, eval_loss, eval_accuracy (classifiers) or eval_bpc (character LM), elapsed_s, and
           wire_bytes_total (this rank's training bytes so far, for plots against bytes)
  round    (--average-every > 1) step, round, wire_bytes (this round's: the report and the compressed
           deltas), dense_bytes, skipped_rounds, delta_norm (root mean square over ranks of
           ||anchor - params_i|| before compression), mean_delta_norm (estimate of the norm of their
           mean), sent_delta_norm (the mean delta after compression, what the outer step used),
           disagreement (estimate of mean_i ||params_i - mean params||^2 before the average),
           + compressor stats
  compressor_choice  (--compressor auto) step, choice (dense or greedylore), dense_step_s, dense_exchange_s,
           greedylore_step_s, greedylore_exchange_s (the slowest rank's medians), dense_bytes, achieved_gbps
           (a dense Allreduce's bytes on the wire over its time)
  summary  the numbers printed at the end
Byte convention: `wire_bytes` is what this rank handed to every collective in the step, as counted
by comm.py (a whole buffer for Allreduce, its own payload for Allgatherv); `dense_bytes` is what
one dense fp32 Allreduce of all gradients would hand over (4 bytes x parameters). Their ratio is
the compression ratio, whatever the compressor.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

from tqdm import tqdm

from .config import CannotWrite, UsageError, one_line
from .data import DEFAULT_BATCH


def check_folder(folder: str, what: str = "run dir"):
    """A folder to write into must exist or be makeable, and be writable: checked before anything
    is written (a file in its place, a read-only file system)."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{what} {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {folder}: cannot write in {existing}")


def require_tensorboard():
    """--tensorboard needs torch's writer and the tensorboard package; say so in one line if absent."""
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install 'mpitrain[tensorboard]'") from None


def on_nodes(nodes: list[str], shown: int = 8) -> str:
    """', on 2 nodes (a, b)' from every rank's node name; long lists end in how many more."""
    unique = list(dict.fromkeys(nodes))
    if not unique:
        return ""
    names = ", ".join(unique[:shown]) + (f", ... {len(unique) - shown} more" if len(unique) > shown else "")
    return f", on {len(unique)} node{'s' if len(unique) > 1 else ''} ({names})"


def on_devices(nodes: list[str], devices: list[str]) -> str:
    """'; devices: a (cuda:0 (name), cuda:1)' naming each node's devices, or nothing when every rank
    computes on the CPU."""
    if all(d == "cpu" for d in devices):
        return ""
    per_node = {}
    for node, dev in zip(nodes, devices):
        per_node.setdefault(node, {})[dev] = None  # each device once, in rank order
    return "; devices: " + ", ".join(f"{node} ({', '.join(devs)})" for node, devs in per_node.items())


class RunLog:
    def __init__(self, cfg, world, total_steps: int):
        self.active = world.rank == 0
        self.cfg, self.total = cfg, total_steps
        self.bar = None
        if not self.active:
            return
        with self._writing("config.json"):
            os.makedirs(cfg.run_dir, exist_ok=True)
            with open(os.path.join(cfg.run_dir, "config.json"), "w") as fh:
                fh.write(cfg.to_json() + "\n")
            self._fh = open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a")
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(cfg.run_dir, "tensorboard"))

    def start(self, size: int, batches, chosen: bool, first_step: int = 0, nodes: list[str] = (),
              devices: list[str] = (), two_level: bool = False):
        """The start-up line: what is trained, on how many ranks, with what batch; then the bar."""
        if not self.active:
            return
        cfg, rows = self.cfg, batches.dataset.n_train
        averaging = "" if cfg.average_every == 1 else \
            f" on parameter deltas every {cfg.average_every} steps (outer step {cfg.outer_optimizer})"
        micro = batches.batch // cfg.accumulate
        how = f" (the default {DEFAULT_BATCH} per rank would not fit the training rows)" \
            if chosen and micro < DEFAULT_BATCH else ""
        each = f"{micro} samples per rank" + (f" x {cfg.accumulate} micro-batches" if cfg.accumulate > 1 else "")
        print(f"mpitrain: {cfg.model} on {cfg.dataset} ({rows} training rows), {size} ranks x {each} "
              f"= global batch {size * batches.batch}{how}, {batches.steps_per_epoch} steps per "
              f"epoch{on_nodes(nodes)}{on_devices(nodes, devices)}; compressor {cfg.compressor}"
              f"{' per node share, across the nodes (--hierarchy node)' if two_level else ''}{averaging}, "
              f"{cfg.steps} steps, run dir {cfg.run_dir}", flush=True)
        if cfg.progress == "always" or (cfg.progress == "auto" and sys.stdout.isatty()):
            self.bar = tqdm(total=self.total, initial=first_step, unit="step", dynamic_ncols=True, file=sys.stdout)

    def _writing(self, name: str):
        """A full disk or a lost mount is one line (CannotWrite), not a traceback."""
        path = os.path.join(self.cfg.run_dir, name)
        return one_line(OSError, CannotWrite, lambda e: f"cannot write {path}: {e.strerror or e}")

    def _write(self, record: dict):
        with self._writing("metrics.jsonl"):
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()
        if self._tb is not None and record["kind"] in ("train", "eval", "round"):
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def _say(self, text: str):
        (self.bar.write if self.bar is not None else print)(text)

    def train(self, record: dict):
        if not self.active:
            return
        self._write({"kind": "train", **record})
        ratio = record["dense_bytes"] / max(record["wire_bytes"], 1)
        # a skipped step's loss is recorded as 0.0: printed, it would read as a perfect fit
        loss = "skipped (non-finite)" if record["skipped"] else f"{record['loss']:.4f}"
        text = f"loss {loss} lr {record['lr']:.3g} wire {record['wire_bytes'] / 1e3:.1f} kB " \
               f"({ratio:.1f}x) {record['step_time_s'] * 1e3:.1f} ms" + \
               (f", {record['skipped_steps']} steps skipped" if record["skipped_steps"] else "")
        if self.bar is not None:
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix_str(text, refresh=False)
        else:
            print(f"step {record['step']}/{self.total} {text}", flush=True)

    def choice(self, record: dict):
        """--compressor auto's decision, and the measured step times behind it."""
        if not self.active:
            return
        self._write({"kind": "compressor_choice", **record})
        rate = f", the network moving {record['achieved_gbps']:.3g} Gbit/s" if record["achieved_gbps"] else ""
        self._say(f"mpitrain: --compressor auto chose {record['choice']} at step {record['step']}: a dense step "
                  f"{record['dense_step_s'] * 1e3:.1f} ms (exchange {record['dense_exchange_s'] * 1e3:.1f} ms{rate}), "
                  f"a greedylore step {record['greedylore_step_s'] * 1e3:.1f} ms "
                  f"(exchange {record['greedylore_exchange_s'] * 1e3:.1f} ms)")

    def round(self, record: dict):
        if self.active:
            self._write({"kind": "round", **record})

    def eval(self, record: dict):
        if not self.active:
            return
        self._write({"kind": "eval", **record})
        text = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("eval_"))
        self._say(f"eval at step {record['step']}: {text}")

    def summary(self, record: dict):
        if not self.active:
            return
        self._write({"kind": "summary", **record})
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self.bar is not None:
            self.bar.close()
        metric = {k: v for k, v in record.items() if k.startswith("eval_")}
        ratio = record["dense_bytes_per_rank"] / max(record["wire_bytes_per_rank"], 1)
        sent = (f"; sent per rank {record['wire_bytes_per_rank'] / 1e6:.2f} MB (dense "
                f"{record['dense_bytes_per_rank'] / 1e6:.2f} MB, {ratio:.2f}x)" if record["steps_run"] else "")
        trained = (f"{record['steps']} steps on {record['world_size']} ranks in {record['wall_time_s']:.1f} s"
                   if record["steps_run"] else f"nothing left to train, resumed at or past --steps {record['steps']}")
        print(f"done: {trained}; " + "  ".join(f"{k} {v:.4f}" for k, v in metric.items()) +
              f"{sent}; run dir {record['run_dir']}" +
              (f"; {record['skipped_steps']} of {record['steps_run']} steps skipped (non-finite loss or gradients)"
               if record["skipped_steps"] else ""), flush=True)
