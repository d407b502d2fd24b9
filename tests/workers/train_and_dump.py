"""Train with the given flags; every rank writes its final parameters to OUT/params-<rank>.npy.

    mpiexec -n N python train_and_dump.py OUT [trainer flags...]

OUT is the run dir too, unless the flags name another.
"""
import sys
from pathlib import Path

import numpy as np

from mpitrain import compress, train
from mpitrain.config import Parser
from mpitrain.comm import World
from mpitrain.config import add_arguments, resolve

out = Path(sys.argv[1])
world = World()
parser = Parser()
add_arguments(parser, compress.names())
flags = sys.argv[2:] if "--run-dir" in sys.argv[2:] else sys.argv[2:] + ["--run-dir", str(out)]
cfg = resolve(parser.parse_args(flags), compressors=compress.names())
train.set_threads(cfg, world)
run = train.prepare(cfg, world)
if world.rank == 0:
    np.save(out / "params-init.npy", run.layout.params_np)  # what rank 0 broadcasts at the start
train.resume(run, world)
train.train(run, world)
np.save(out / f"params-{world.rank}.npy", run.layout.params_np)
