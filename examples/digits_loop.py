"""Your own training loop on mpitrain's public API: an MLP on the bundled digits, gradients
averaged over the ranks through GreedyLore, checkpoints that resume exactly.

    mpiexec -n 2 python examples/digits_loop.py --run-dir runs/example
    mpiexec -n 2 python examples/digits_loop.py --run-dir runs/example --steps 600   # resumes, goes on

It makes the same choices as `python -m mpitrain --compressor greedylore` (model, seed, batches,
learning-rate schedule), so both reach the same accuracy; change anything here, it is your loop.
Prints one JSON line on rank 0: final accuracy, steps, bytes sent.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mpitrain

DIGITS = Path(__file__).resolve().parent.parent / "data" / "digits.h5"


def lr_at(step: int, steps: int, peak: float = 0.05, warmup: int = 20) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def accuracy(model, x, y, world, device) -> float:
    """Correct predictions over this rank's share of the test rows, summed over the ranks."""
    with torch.no_grad():
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        correct = int((model(x).argmax(-1) == y).sum())
    totals = world.allreduce_(np.array([correct, len(y)], dtype=np.float64))
    return float(totals[0] / totals[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="", help="output folder (default: runs/<UTC time>, as the command)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--compressor", default="greedylore")
    args = parser.parse_args()

    world = mpitrain.init()  # MPI starts here; an exception on any rank now ends the whole job
    run_dir = args.run_dir or mpitrain.default_run_dir(world)
    mpitrain.set_threads(world)
    with h5py.File(DIGITS, "r") as f:
        arrays = {key: f[key][()] for key in ("x_train", "y_train", "x_test", "y_test")}
    data = mpitrain.ArrayData({"task": "classify", "input_shape": (1, 8, 8), "num_classes": 10}, **arrays)
    batches = mpitrain.ShardedBatches(data, batch=32, rank=world.rank, size=world.size, seed=0)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    exchange = mpitrain.Exchange(model, world, compressor=args.compressor, rank=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    resumed = mpitrain.load_checkpoint(exchange, optimizer, run_dir=run_dir)  # or rank 0's initial weights

    for step in range(resumed.step if resumed else 0, args.steps):
        x, y = (torch.from_numpy(a).to(exchange.device) for a in batches.batch_at(step))  # the rank's GPU, or CPU
        exchange.zero_grad()
        exchange.backward(F.cross_entropy(model(x), y))
        averaged = exchange.average(step)  # the global mean gradient, the same on every rank
        if not averaged.nonfinite:  # some rank's gradient was NaN/Inf: every rank skips the step
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args.steps)
            optimizer.step()
        done = step + 1
        if averaged.stop or done == args.steps or done % args.checkpoint_every == 0:
            mpitrain.save_checkpoint(run_dir, done, exchange, optimizer, epoch=batches.epoch_of(done),
                                     extra_json={"example": "digits_loop", "loss": averaged.loss})
        if averaged.stop:  # SIGUSR1/SIGTERM reached some rank: checkpointed, ask to be requeued
            mpitrain.wait_for_checkpoints()  # rank 0 writes in the background
            return 75
    mpitrain.wait_for_checkpoints()

    x, y = data.rows("test", np.arange(world.rank, data.n_test, world.size))
    result = {"eval_accuracy": accuracy(model, x, y, world, exchange.device), "steps": args.steps,
              "wire_bytes": exchange.wire_bytes_total}
    if world.rank == 0:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
