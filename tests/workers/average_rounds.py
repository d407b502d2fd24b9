"""Parameter averaging through the public API, checked against the arithmetic by rank 0.

    mpiexec -n N python average_rounds.py OUT.json OUTER

Every rank trains a small model on its own random data with H = 4 local SGD steps per round
(dense deltas). Before each average rank 0 gathers every rank's parameters and predicts the
round: the anchor minus the mean delta (average), or DiLoCo's Nesterov step (nesterov); after it,
every rank's parameters are gathered again. OUT.json holds the worst errors seen.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import mpitrain

out, outer = sys.argv[1], sys.argv[2]
H, LR, MU = 4, 0.7, 0.9
world = mpitrain.init()
torch.manual_seed(world.rank)  # different on every rank: load_checkpoint must make them equal
model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 4))
exchange = mpitrain.Exchange(model, world, compressor="dense", average_every=H, outer_optimizer=outer,
                             outer_lr=LR, outer_momentum=MU)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
assert mpitrain.load_checkpoint(exchange, optimizer, resume="none", run_dir=str(Path(out).parent / "run")) is None
params = exchange.layout.params_np
data = torch.Generator().manual_seed(100 + world.rank)
anchor, velocity = params.copy(), np.zeros_like(params, dtype=np.float64)
worst = {"params": 0.0, "ranks_differ": 0.0, "delta_norm": 0.0, "sent_delta_norm": 0.0, "disagreement": 0.0,
         "local_step_bytes": [], "loss": 0.0, "rounds": 0, "disagreement_exact": []}
for step in range(3 * H):
    x = torch.randn(32, 8, generator=data)
    y = torch.randn(32, 4, generator=data) + world.rank  # each rank pulls toward its own target
    exchange.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    exchange.backward(loss)
    agreed = exchange.average(step)
    losses = world.gather(np.array([float(loss.detach())]))
    optimizer.step()
    local = world.gather(params.copy())
    done = exchange.average_parameters(step)
    after = world.gather(params.copy())
    if world.rank != 0:
        continue
    worst["loss"] = max(worst["loss"], abs(agreed.loss - losses.mean()) / losses.mean())
    if done is None:
        worst["local_step_bytes"].append(agreed.wire_bytes)
        continue
    worst["rounds"] += 1
    deltas = anchor.astype(np.float64) - local
    mean = deltas.mean(0)
    if outer == "average":
        expected = anchor - mean
    else:
        velocity = MU * velocity + mean
        expected = anchor - LR * (mean + MU * velocity)
    scale = np.abs(expected).max()
    worst["params"] = max(worst["params"], np.abs(after[0] - expected).max() / scale)
    worst["ranks_differ"] = max(worst["ranks_differ"], float(np.abs(after - after[0]).max()))
    exact = {"delta_norm": math.sqrt((deltas ** 2).sum(1).mean()), "sent_delta_norm": float(np.linalg.norm(mean)),
             "disagreement": float(((deltas - mean) ** 2).sum(1).mean())}
    for key, value in exact.items():
        worst[key] = max(worst[key], abs(done.stats[key] - value) / value)
    worst["disagreement_exact"].append(exact["disagreement"])
    anchor = after[0].copy()
if world.rank == 0:
    with open(out, "w") as fh:
        json.dump(worst, fh)
