"""World.two_level_allreduce_ against the flat Allreduce, on integer-valued floats (exact sums, so
the two must agree bit for bit): node reduce-scatter, network Allreduce, node allgather.

    mpiexec -n 2 env MPITRAIN_NODE=a python two_level.py OUT : -n 2 env MPITRAIN_NODE=b python two_level.py OUT
"""
import json
import sys
from pathlib import Path

import numpy as np

from mpitrain.comm import World

out = Path(sys.argv[1])
world = World(stall_timeout=30)
agree = []
for d in (1, 7, 1001, 65536):  # fewer values than ranks, uneven shares, even ones
    x = np.random.default_rng([world.rank, d]).integers(-1000, 1000, d).astype(np.float32)
    flat, two = x.copy(), x.copy()
    world.raw_allreduce_(flat)
    world.two_level_allreduce_(two)
    agree.append(bool(np.array_equal(flat, two)) and bool(np.any(two != x)))
(out / f"rank-{world.rank}.json").write_text(json.dumps({"agree": agree, "node": world.node_name,
                                                          "local": [world.local_rank, world.local_size]}))
