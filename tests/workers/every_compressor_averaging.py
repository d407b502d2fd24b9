"""The command's loop with --average-every 3 and every compressor, one after another in one job.

    mpiexec -n N python every_compressor_averaging.py OUT_DIR

Rank 0 writes OUT_DIR/results.json: per compressor, the summary and the step of every round.
"""
import json
import os
import sys

from mpitrain import api, compress, train
from mpitrain.config import checked

out = sys.argv[1]
world = api.init()
api.set_threads(world)
results = {}
for name in compress.names():
    cfg = checked(model="user_models:tiny", compressor=name, average_every=3, steps=8, start_compress_step=1,
                  sync_check_every=2, eval_every=0, log_every=1, progress="never", block=4,
                  run_dir=os.path.join(out, name))
    run = train.prepare(cfg, world)
    train.resume(run, world)
    summary = train.train(run, world)
    if world.rank == 0:
        with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as fh:
            rounds = [x["step"] for x in map(json.loads, fh) if x["kind"] == "round"]
        results[name] = {"summary": summary, "rounds": rounds}
if world.rank == 0:
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(results, fh)
