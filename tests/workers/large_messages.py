"""Allgatherv, Alltoallv, Allreduce, Bcast and Gather (also with the root's part in place) with the per-call
limit lowered to a few hundred bytes, so that payloads go in pieces and rounds, compared with the
same calls made whole.

    mpiexec -n N python large_messages.py OUT     (rank 0 writes OUT/report.json)
"""
import json
import sys
from pathlib import Path

import numpy as np

from mpitrain.comm import World

world = World(stall_timeout=30)
rng = np.random.default_rng(world.rank)
sizes = [1000 + 337 * world.rank, 0 if world.rank == 1 else 50, 7]  # uneven, empty, tiny
payloads = [rng.integers(0, 256, size=n, dtype=np.uint8) for n in sizes]
floats = rng.standard_normal(2500).astype(np.float32)
calls = world.calls
gathered_whole = [world.allgatherv(p) for p in payloads]
calls_whole, calls = world.calls - calls, world.calls
summed_whole = world.allreduce_(floats.copy())
shared_whole = world.bcast_(floats.copy() if world.rank == 0 else np.zeros_like(floats))
stacked_whole = world.gather(floats[:900].copy())


def gathered_in_place():
    """Rank 0's part already where it goes: MPI's in-place gather (whole) or pieces that read it there."""
    if world.rank != 0:
        return world.gather(floats[:900].copy())
    out = np.full((world.size, 900), np.nan, dtype=np.float32)
    out[0] = floats[:900]
    return world.gather(out[0], out=out)


in_place_whole = gathered_in_place()


def part(sender: int, to: int) -> np.ndarray:
    """What `sender` sends `to` in the Alltoallv: uneven sizes, rank 1's part for rank 0 empty."""
    size = 0 if (sender, to) == (1, 0) else 300 + 211 * sender + 57 * to
    return np.random.default_rng([sender, to]).integers(0, 256, size=size, dtype=np.uint8)


swapped_whole = world.alltoallv([part(world.rank, j) for j in range(world.size)])

world.max_message_bytes = 256
gathered = [world.allgatherv(p) for p in payloads]
calls_in_pieces = world.calls - calls
summed = world.allreduce_(floats.copy())
shared = world.bcast_(floats.copy() if world.rank == 0 else np.zeros_like(floats))
stacked = world.gather(floats[:900].copy())
in_place = gathered_in_place()
swapped = world.alltoallv([part(world.rank, j) for j in range(world.size)])

equal = all(np.array_equal(a, b) for whole, part in zip(gathered_whole, gathered) for a, b in zip(whole, part))
equal &= all(len(whole) == world.size for whole in gathered)
equal &= all(np.array_equal(a, part(i, world.rank)) and np.array_equal(b, a)
             for i, (a, b) in enumerate(zip(swapped_whole, swapped, strict=True)))
equal &= np.array_equal(summed_whole, summed) and np.array_equal(shared_whole, shared)
equal &= world.rank != 0 or all(np.array_equal(stacked_whole, x) for x in (stacked, in_place_whole, in_place))
# one size exchange + one Allgatherv per payload whole; in pieces, the largest payload alone takes
# ceil(max size / (256 // N)) rounds
largest = 1000 + 337 * (world.size - 1)
pieces = calls_whole == 6 and calls_in_pieces >= 3 + -(-largest // (256 // world.size))
ok = world.allreduce_(np.array([int(equal), int(pieces)], dtype=np.int64), op="min")
if world.rank == 0:
    Path(sys.argv[1], "report.json").write_text(json.dumps({"equal": bool(ok[0]), "pieces_used": bool(ok[1])}))
