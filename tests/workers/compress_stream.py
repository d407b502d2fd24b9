"""Drive one compressor over a synthetic gradient stream; every rank dumps what it saw and kept.

    mpiexec -n N python compress_stream.py OUT STREAM STEPS [config flags...]

Streams (per step t and rank i; every matrix slot gets its own draw):
  noise     independent Gaussian gradients, different on every rank
  drift     a rank-3 signal turning over time, plus rank-dependent noise (the brief's Test 2)
  geometric fixed geometric column energies 0.7^j under a random rotation, plus noise
  rankone   one 2 x 2 matrix: G = e1 e1^T at the first compressed step, e2 e2^T afterwards
With PERTURB_BASIS_AT=t in the environment, rank 1 moves the last value of its greedylore bases by
one ulp before step t (a basis that drifted on one rank).
OUT/rank-<i>.npz holds, per step: g (the share handed in), e_old, e_new (residuals), result
(what aggregate left), p (the selected projectors), ratios (per-matrix contraction when
measured), wire (bytes sent), refresh; plus the final compressor state.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpitrain import compress
from mpitrain.config import Parser
from mpitrain.comm import World
from mpitrain.config import add_arguments, resolve
from mpitrain.layout import GradLayout

out, stream, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
world = World()
parser = Parser()
add_arguments(parser, compress.names())
cfg = resolve(parser.parse_args(sys.argv[4:] + ["--run-dir", str(out)]), compressors=compress.names())

# an ineligible matrix (6 x 30) sits between compressed ones, so dense stretches interleave
SHAPES = {"rankone": [(2, 2)]}.get(stream, [(24, 40), (6, 30), (48, 16), (12, 12), (8, 3, 2, 2), (5,)])
model = nn.Module()
for k, shape in enumerate(SHAPES):
    model.register_parameter(f"w{k}", nn.Parameter(torch.zeros(shape)))
layout = GradLayout(model)
comp = compress.build(cfg, layout, world)


def gradient(slot, t):
    n, m = (slot.n, slot.m) if slot.is_matrix else (slot.numel, 1)
    own = np.random.default_rng([cfg.seed, t, slot.index, world.rank])
    shared = np.random.default_rng([cfg.seed, slot.index])
    if stream == "rankone":
        e = np.zeros((2, 2))
        e[(0, 0) if t <= cfg.start_compress_step else (1, 1)] = 1.0
        return e
    noise = own.standard_normal((n, m))
    if stream == "noise":
        return noise
    if stream == "geometric":
        rot, _ = np.linalg.qr(shared.standard_normal((n, n)))
        return rot @ (shared.standard_normal((n, m)) * 0.7 ** (np.arange(n)[:, None] / 2)) + 0.05 * noise
    # drift: a rank-3 signal whose left factor turns by 90 degrees every 40 steps
    a, b = shared.standard_normal((n, 3)), shared.standard_normal((3, m))
    c, s = np.cos(np.pi / 80 * t), np.sin(np.pi / 80 * t)
    left = c * a + s * np.roll(a, 1, axis=0)
    return left @ b + 0.3 * noise


record = {k: [] for k in ("g", "e_old", "e_new", "result", "p", "ratios", "wire", "refresh", "stats")}
for t in range(steps):
    for slot in layout.slots:
        layout.view(layout.grads, slot).copy_(torch.from_numpy(gradient(slot, t).reshape(slot.shape) / world.size))
    layout.control.clear()
    residual = comp.feedback.array(copy=False) if hasattr(comp, "feedback") else None
    record["g"].append(layout.grads.numpy().copy())
    record["e_old"].append(residual.copy() if residual is not None else np.zeros(0))
    if os.environ.get("PERTURB_BASIS_AT") == str(t) and world.rank == 1:
        comp.basis.bases.np[-1] = np.nextafter(comp.basis.bases.np[-1], np.float32(np.inf))
    world.take_sent_bytes()
    comp.last_ratios = []
    comp.aggregate(t)
    record["wire"].append(world.take_sent_bytes())
    record["e_new"].append(residual.copy() if residual is not None else np.zeros(0))
    record["result"].append(layout.grads.numpy().copy())
    record["p"].append(comp.p.np.copy() if hasattr(comp, "p") else np.zeros(0))
    n_compressed = len(getattr(comp, "slots", []))
    record["ratios"].append(np.array(comp.last_ratios or [np.nan] * n_compressed, dtype=np.float64))
    record["refresh"].append(bool(comp.stats.get("refresh", False)))
    record["stats"].append(json.dumps({**comp.stats, "segment_bits": getattr(comp, "segment_bits", [])}))

state = comp.state_dict()
np.savez(out / f"rank-{world.rank}.npz",
         **{k: np.array(v) for k, v in record.items()},
         **{f"shared_{k}": np.asarray(v) for k, v in state.get("shared", {}).items()},
         shapes=np.array(json.dumps([[s.name, s.offset, s.numel, list(s.shape)] for s in layout.slots])),
         compressed=np.array([s.index for s in getattr(comp, "slots", [])], dtype=int),
         basis_rebroadcasts=np.array(getattr(getattr(comp, "basis", None), "rebroadcasts", 0)))
