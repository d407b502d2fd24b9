"""How many buckets were in flight when backward returned, with --bucket-mb small enough for several.

    mpiexec -n N python overlap_started.py OUT [COMPRESSOR [SKETCH_BITS]]

OUT: the JSON file, or a folder to write out.json in.
"""
import json
import sys
from pathlib import Path

import torch

import mpitrain
from mpitrain import models
from mpitrain.data import Dataset, ShardedBatches, locate

world = mpitrain.init()
dataset = Dataset(locate("digits"))
torch.manual_seed(0)
model = models.build("cnn", dataset.info)
compressor = sys.argv[2] if len(sys.argv) > 2 else "dense"
knobs = {"sketch_bits": int(sys.argv[3])} if len(sys.argv) > 3 else {}
exchange = mpitrain.Exchange(model, world, compressor=compressor, bucket_mb=0.02, start_compress_step=0,
                            overlap_encoding="on", **knobs)
batches = ShardedBatches(dataset, 16, world.rank, world.size, 0)
found = []
for step in range(4):
    x, y = batches.batch_at(step)
    exchange.zero_grad()
    exchange.backward(models.loss_and_metric(model(torch.from_numpy(x)), torch.from_numpy(y), "classify")[0])
    buckets = exchange.compressor.buckets
    found.append({"step": step, "buckets": len(buckets), "started_in_backward": buckets.started,
                  "in_flight": len(buckets.requests or []), "encodings": len(getattr(exchange.compressor, "jobs", []))})
    exchange.average(step)
if world.rank == 0:
    out = Path(sys.argv[1])
    (out / "out.json" if out.is_dir() else out).write_text(json.dumps(found))
