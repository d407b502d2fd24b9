"""World.node_first: fn runs on each node's first rank only, and every rank of the node gets its result.

    mpiexec -n N python node_first.py OUT     (each rank writes OUT/result-RANK.json; fn leaves OUT/called-RANK)
"""
import json
import sys
from pathlib import Path

from mpitrain.comm import World

out = Path(sys.argv[1])
world = World(stall_timeout=30)


def check():
    (out / f"called-{world.rank}").touch()
    return {"checked_by": world.rank, "faults": ["a fault line from the first rank"]}


got = world.node_first(check)
(out / f"result-{world.rank}.json").write_text(json.dumps({"got": got, "local_rank": world.local_rank}))
