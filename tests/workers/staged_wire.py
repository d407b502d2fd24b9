"""Collectives through the host buffer a device rank stages through, run here on CPU tensors: the
same bits and the same bytes counted as handing the tensors' memory to MPI.

    mpiexec -n N python staged_wire.py OUT [config flags...]

OUT/rank-<i>.npz: for the Wire itself (float32 sum and max, int16 sum, a broadcast), for each
low-rank and dense compressor run 6 steps both ways, and for quantizers run on a host twin of the
layout (as a device rank runs them) and on the layout itself: whether the results are bitwise
equal, and the bytes each way counted.
"""
import dataclasses
import functools
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpitrain import compress
from mpitrain.comm import World
from mpitrain.compress import base
from mpitrain.compress.host import OnHost
from mpitrain.config import Parser, add_arguments, resolve
from mpitrain.device import Wire
from mpitrain.layout import GradLayout

out = Path(sys.argv[1])
world = World()
parser = Parser()
add_arguments(parser, compress.names())
cfg = resolve(parser.parse_args(sys.argv[2:] + ["--run-dir", str(out)]), compressors=compress.names())
record = {}


def both(name, make, collective):
    """The collective on two equal tensors, one handed to MPI as it is and one staged."""
    got, sent = [], []
    for stage in (False, True):
        t = make()
        world.take_sent_bytes()
        collective(Wire(world, "cpu", stage=stage), t)
        got.append(t)
        sent.append(world.take_sent_bytes())
    record[f"{name}_equal"] = torch.equal(*got) and bool(got[0].abs().sum() > 0)
    record[f"{name}_bytes"] = np.array(sent)


def draws(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(world.rank))


both("sum", lambda: draws(1000), lambda w, t: w.allreduce_(t))
both("max", lambda: draws(77), lambda w, t: w.allreduce_(t, "max"))
both("int16", lambda: torch.arange(-50, 50, dtype=torch.int16) * (world.rank + 1), lambda w, t: w.allreduce_(t))
both("bcast", lambda: torch.full((9, 4), float(world.rank + 1)), lambda w, t: w.bcast_(t))


def run(name: str, stage: bool):
    """`name` on staged collectives (stage) or direct ones; a quantizer on a host twin of its layout
    (stage), as a device rank runs it, or on the layout itself."""
    model = nn.Module()
    for k, shape in enumerate([(24, 40), (6, 30), (48, 16), (5,)]):
        model.register_parameter(f"w{k}", nn.Parameter(torch.zeros(shape)))
    layout = GradLayout(model)
    base.Wire = functools.partial(Wire, stage=stage)  # what a device rank's compressor is built with
    try:
        chosen = dataclasses.replace(cfg, compressor=name, kernels="torch", start_compress_step=2)
        cls = compress.compressor_class(name)
        comp = OnHost(cls, layout, world, chosen) if stage and not cls.on_device else cls(layout, world, chosen)
    finally:
        base.Wire = Wire
    results, sent = [], 0
    for t in range(6):
        for slot in layout.slots:
            rng = np.random.default_rng([t, slot.index, world.rank])
            layout.view(layout.grads, slot).copy_(torch.from_numpy(rng.standard_normal(slot.shape).astype(np.float32)))
        layout.control.clear()
        world.take_sent_bytes()
        comp.aggregate(t)
        sent += world.take_sent_bytes()
        results.append(layout.flat.clone())
    return torch.stack(results), sent


for name in ("dense", "powersgd", "greedylore", "greedylore-paper", "sparse-dither", "qsgd", "topk", "natural"):
    (direct, direct_sent), (staged, staged_sent) = run(name, False), run(name, True)
    record[f"{name}_equal"] = torch.equal(direct, staged)
    record[f"{name}_bytes"] = np.array([direct_sent, staged_sent])
np.savez(out / f"rank-{world.rank}.npz", **{k: np.asarray(v) for k, v in record.items()})
