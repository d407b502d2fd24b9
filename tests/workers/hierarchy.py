"""--hierarchy node against its definition, a flat exchange of the node sums: two nodes of two ranks,
each rank training one model through the two-level exchange and one through a flat exchange among
the ranks of its local rank (the network) fed its node's summed gradient.

    mpiexec -n 2 env MPITRAIN_NODE=a python hierarchy.py OUT : -n 2 env MPITRAIN_NODE=b python hierarchy.py OUT

With `stall` after OUT: rank 3 stops answering in its fourth step; the watchdog must name it.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mpitrain.api import Exchange, load_checkpoint, save_checkpoint
from mpitrain.comm import World

out, stall = Path(sys.argv[1]), sys.argv[2:] == ["stall"]
world = World(stall_timeout=3 if stall else 60)
node = world.node()
OPTIONS = dict(rank=2, start_compress_step=2, refresh_every=3, bucket_mb=0.0, lr=0.05, seed=3, ef_resume="gather")


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 4))


def loss_of(net, step):
    g = torch.Generator().manual_seed(1000 * step + world.rank)
    x, y = torch.randn(8, 24, generator=g), torch.randn(8, 4, generator=g)
    return torch.nn.functional.mse_loss(net(x), y)


if stall:
    net = model()
    exchange = Exchange(net, world, "greedylore", hierarchy="node", **OPTIONS)
    for step in range(10):
        if step == 3 and world.rank == 3:
            time.sleep(600)
        exchange.zero_grad()
        loss = loss_of(net, step)
        loss.backward()
        exchange.average(step, loss)
    sys.exit(0)

ARMS = {"dense": ("dense", {}), "powersgd": ("powersgd", {}), "greedylore-paper": ("greedylore-paper", {}),
        "greedylore": ("greedylore", {}), "greedylore-s32": ("greedylore", {"sketch_bits": 32}), "topk": ("topk", {})}
report = {"node": world.node_name, "local": [world.local_rank, world.local_size]}
for name, (compressor, knobs) in ARMS.items():
    two, flat = model(), model()
    a = Exchange(two, world, compressor, hierarchy="node", **OPTIONS, **knobs)
    b = Exchange(flat, node.network, compressor, hierarchy="flat", **OPTIONS, **knobs)
    node.network.take_sent_bytes()  # b's set-up: from here on the network counts the exchanges only
    start = a.layout.params.clone()
    opt_a, opt_b = torch.optim.SGD(two.parameters(), lr=0.05), torch.optim.SGD(flat.parameters(), lr=0.05)
    row = {"same": [], "loss_ok": [], "network": [], "flat_bytes": [], "node_bytes": []}
    for step in range(8):
        a.zero_grad()
        loss = loss_of(two, step)
        loss.backward()
        got = a.average(step, loss)
        everyone = world.allreduce_(np.array([float(loss)]))[0] / world.size
        row["loss_ok"].append(bool(abs(got.loss - everyone) <= 1e-6 * max(1.0, abs(everyone))))
        b.zero_grad()
        loss_b = loss_of(flat, step)
        loss_b.backward()
        node.allreduce_(b.layout.flat_np)  # the node's summed gradient (and loss word), then its mean
        b.layout.grads.mul_(1.0 / world.local_size)
        b.average(step, loss_b)
        row["same"].append(bool(torch.equal(a.layout.grads, b.layout.grads)))
        network = node.allreduce_(np.array([got.stats["network_bytes"]], dtype=np.int64))[0]
        row["network"].append(int(network))
        row["flat_bytes"].append(int(b.world.take_sent_bytes()))
        row["node_bytes"].append(got.stats["node_bytes"])
        opt_a.step()
        opt_b.step()
    params = a.layout.params.numpy().copy()
    everywhere = world.allreduce_(params.copy(), op="max")
    row["agree"] = bool(np.array_equal(params, everywhere))
    row["moved"] = bool(not torch.equal(a.layout.params, start))
    # a checkpoint of the two-level state, loaded into a new exchange: the next step is the same
    save_checkpoint(out / name, 8, a, opt_a, background=False)
    again = model()
    c = Exchange(again, world, compressor, hierarchy="node", **OPTIONS, **knobs)
    opt_c = torch.optim.SGD(again.parameters(), lr=0.05)
    load_checkpoint(c, opt_c, run_dir=str(out / name))
    for exchange, net in ((a, two), (c, again)):
        exchange.zero_grad()
        loss = loss_of(net, 8)
        loss.backward()
        exchange.average(8, loss)
    row["resumed"] = bool(torch.equal(a.layout.grads, c.layout.grads)) and bool(torch.equal(a.layout.params,
                                                                                             c.layout.params))
    report[name] = row
(out / f"rank-{world.rank}.json").write_text(json.dumps(report))
