"""save_checkpoint after rank BAD's parameters went infinite (-1: nobody's).

    python save_diverged.py RUN_DIR BAD
"""
import sys

import torch

import mpitrain

run_dir, bad = sys.argv[1], int(sys.argv[2])
world = mpitrain.init()
model = torch.nn.Linear(4, 3)
exchange = mpitrain.Exchange(model, world)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
if world.rank == bad:
    with torch.no_grad():
        model.weight[1, 2] = float("inf")
world.where = "step 7"
mpitrain.save_checkpoint(run_dir, 7, exchange, optimizer)
mpitrain.wait_for_checkpoints()
print(f"rank {world.rank} saved", flush=True)
