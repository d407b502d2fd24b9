"""State by parameter name: what a checkpoint stores under each parameter's name, and back.

Compressors and optimizers keep their state as flat arrays and parameter indices, which is fast;
people who inspect a checkpoint look for a parameter. A flat array that is per-parameter pieces
laid end to end (`Compressor.state_layout`) is stored as one dataset per piece, named and shaped
as its parameter; optimizer state goes under each parameter's name instead of its index."""
from __future__ import annotations

import math

import numpy as np
import torch


def pieces(flat, layout: list[tuple[str, tuple]]) -> dict:
    """{name: its piece of `flat`, in its shape}: views, never copies. `flat` is (n,) or, one row per
    rank, (ranks, n); a snapshot (array, dtype name) gives snapshots."""
    arr, dtype = flat if isinstance(flat, tuple) else (flat, None)
    lead, at, out = arr.shape[:-1], 0, {}
    for name, shape in layout:
        size = math.prod(shape)
        piece = arr[..., at:at + size].reshape(lead + tuple(shape))
        out[name] = piece if dtype is None else (piece, dtype)
        at += size
    if at != arr.shape[-1]:
        raise ValueError(f"state of {arr.shape[-1]} values does not split into {at} for {len(layout)} parameters")
    return out


def joined(group, layout: list[tuple[str, tuple]], read, per_rank: bool = False, row: int | None = None) -> np.ndarray:
    """The flat array an HDF5 group of per-parameter pieces stands for; pieces stored `per_rank`
    (a row per rank first) give one row per rank, or with `row` that rank's row alone, read from
    each piece without the others."""
    parts = [read(group[name]) if row is None else group[name][row] for name, _ in layout]
    rows = per_rank and row is None
    if not parts:
        return np.zeros((group.file.attrs["world_size"], 0) if rows else 0, dtype=np.float32)
    return np.concatenate([p.reshape(p.shape[0], -1) if rows else p.reshape(-1) for p in parts], axis=-1)


def optimizer_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[str]:
    """The name of each of the optimizer's parameters, in its own order (that of its state's
    indices): the model's name for it, or its index for a tensor the model does not hold."""
    names = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [names.get(id(p), str(i)) for i, p in enumerate(params)]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's state tensors in parameter order (the same order on every rank)."""
    return [state[key] for group in optimizer.param_groups for p in group["params"]
            for state in [optimizer.state.get(p, {})] for key in sorted(state) if isinstance(state[key], torch.Tensor)]


def flat_optimizer_state(optimizer: torch.optim.Optimizer) -> np.ndarray:
    """Every state tensor of the optimizer in one float32 row (parameter averaging: one row per rank)."""
    tensors = optimizer_tensors(optimizer)
    odd = sorted({str(t.dtype) for t in tensors if t.dtype != torch.float32})
    if odd:
        raise RuntimeError(f"per-rank optimizer state must be float32 to be checkpointed; found {', '.join(odd)}")
    if not tensors:
        return np.zeros(0, dtype=np.float32)
    return torch.cat([t.detach().reshape(-1).cpu() for t in tensors]).numpy()


def set_optimizer_state(optimizer: torch.optim.Optimizer, row: np.ndarray):
    """The inverse of flat_optimizer_state, into an optimizer whose state tensors exist."""
    offset = 0
    for tensor in optimizer_tensors(optimizer):
        tensor.copy_(torch.from_numpy(row[offset:offset + tensor.numel()]).view(tensor.shape))
        offset += tensor.numel()
