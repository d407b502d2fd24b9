"""Which ranks MPI lets share memory with this one (MPI_COMM_TYPE_SHARED), beside its emulated node.

    python -m mpitrain emulate --nodes 2 --ranks-per-node 2 --link 1gbit -- tests/workers/shared_memory.py OUT
"""
import json
import os
import sys
from pathlib import Path

from mpi4py import MPI  # what MPI itself decides, not what mpitrain.comm derives from MPITRAIN_NODE

world = MPI.COMM_WORLD
shared = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
members = shared.allgather(world.Get_rank())
Path(sys.argv[1], f"rank-{world.Get_rank()}.json").write_text(
    json.dumps({"node": os.environ["MPITRAIN_NODE"], "shares_memory_with": members}))
