"""What rank 0 writes about a run: config.json, metrics.jsonl, a progress bar or plain lines.

metrics.jsonl holds one JSON object per line, each with a `kind`:
  train    step (steps completed), loss (mean over ranks), lr, wire_bytes, dense_bytes, step_time_s, + compressor stats
  eval     step, eval_loss, eval_accuracy (classifiers) or eval_bpc (character LM), and
           wire_bytes_total (this rank's training bytes so far, for plots against bytes)
  summary  the numbers printed at the end
Byte convention: `wire_bytes` is what this rank handed to every collective in the step, as counted
by comm.py (a whole buffer for Allreduce, its own payload for Allgatherv); `dense_bytes` is what
one dense fp32 Allreduce of all gradients would hand over (4 bytes x parameters). Their ratio is
the compression ratio, whatever the compressor.
"""
from __future__ import annotations

import json
import os
import sys

from .data import DEFAULT_BATCH


class RunLog:
    def __init__(self, cfg, world, total_steps: int):
        self.active = world.rank == 0
        self.cfg, self.total = cfg, total_steps
        self.bar = cfg.progress == "always" or (cfg.progress == "auto" and sys.stdout.isatty())
        if not self.active:
            return
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as fh:
            fh.write(cfg.to_json() + "\n")
        self._fh = open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a")

    def start(self, size: int, batches, chosen: bool):
        """The start-up line: what is trained, on how many ranks, with what batch."""
        if not self.active:
            return
        cfg, rows = self.cfg, batches.dataset.n_train
        how = f" (the default {DEFAULT_BATCH} per rank would not fit the training rows)" \
            if chosen and batches.batch < DEFAULT_BATCH else ""
        print(f"mpitrain: {cfg.model} on {cfg.dataset} ({rows} training rows), {size} ranks x {batches.batch} "
              f"samples per rank = global batch {size * batches.batch}{how}, {batches.steps_per_epoch} steps per "
              f"epoch; compressor {cfg.compressor}, {cfg.steps} steps, run dir {cfg.run_dir}", flush=True)

    def _write(self, record: dict):
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def train(self, record: dict):
        if not self.active:
            return
        self._write({"kind": "train", **record})
        step = record["step"]
        ratio = record["dense_bytes"] / max(record["wire_bytes"], 1)
        text = f"step {step}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.3g} " \
               f"wire {record['wire_bytes'] / 1e3:.1f} kB ({ratio:.1f}x) {record['step_time_s'] * 1e3:.1f} ms"
        if self.bar:
            done = int(30 * step / self.total)
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {text}", end="", flush=True)
        else:
            print(text, flush=True)

    def eval(self, record: dict):
        if not self.active:
            return
        self._write({"kind": "eval", **record})
        text = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("eval_"))
        print(("\n" if self.bar else "") + f"eval at step {record['step']}: {text}", flush=True)

    def summary(self, record: dict):
        if not self.active:
            return
        self._write({"kind": "summary", **record})
        self._fh.close()
        metric = {k: v for k, v in record.items() if k.startswith("eval_")}
        ratio = record["dense_bytes_per_rank"] / max(record["wire_bytes_per_rank"], 1)
        print(("\n" if self.bar else "") +
              f"done: {record['steps']} steps on {record['world_size']} ranks in {record['wall_time_s']:.1f} s; " +
              "  ".join(f"{k} {v:.4f}" for k, v in metric.items()) +
              f"; sent per rank {record['wire_bytes_per_rank'] / 1e6:.2f} MB "
              f"(dense {record['dense_bytes_per_rank'] / 1e6:.2f} MB, {ratio:.2f}x); run dir {record['run_dir']}",
              flush=True)
