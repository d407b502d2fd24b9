"""Each rank backpropagates its own batch, writes its gradient, aggregates, writes the result.

    mpiexec -n N python dense_aggregate.py OUT
"""
import sys
from pathlib import Path

import numpy as np
import torch

from mpitrain import compress, models, train
from mpitrain.comm import World
from mpitrain.config import Config

out = Path(sys.argv[1])
world = World()
cfg = Config(model="cnn", batch_size=8, run_dir=str(out))
run = train.prepare(cfg, world)
world.bcast_(run.layout.params_np)
x, y = run.batches.batch_at(0)
loss, _ = models.loss_and_metric(run.model(torch.from_numpy(x)), torch.from_numpy(y), "classify")
loss.backward()  # the unscaled local gradient, for the test's own mean
np.save(out / f"local-{world.rank}.npy", run.layout.grads.numpy())
run.layout.flat.mul_(1.0 / world.size)  # the share the loop hands to a compressor
run.layout.check_bound()
compress.build(cfg, run.layout, world).aggregate(0)
np.save(out / f"aggregate-{world.rank}.npy", run.layout.grads.numpy())
