"""Which device a rank computes on (--device), and collectives on torch tensors wherever they live.

A CPU tensor's memory goes to MPI as it is (a numpy view shares it). A device tensor goes through
a host buffer of this rank's, pinned so that the copies run at the bus's speed: copied out, summed
or broadcast, copied back. The bytes counted are those handed to MPI, as for any collective.
"""
from __future__ import annotations

import torch

from .config import UsageError

# One host buffer per dtype for the whole process: collectives here block, so every Wire (a
# compressor's, and those of the two that --compressor auto holds) can share it, and pinned memory
# as large as the gradients is held once.
_HOST: dict[torch.dtype, torch.Tensor] = {}


def choose(request: str, local_rank: int) -> torch.device:
    """--device: cpu; cuda (an error when this rank sees none); auto: cuda:(local_rank % devices)
    when CUDA is available, else the CPU. Two ranks may share a device."""
    if request == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if request == "cuda":
            raise UsageError("--device cuda: this rank sees no CUDA device (torch.cuda.is_available() is False); "
                             "use --device cpu, or auto to take a GPU only where there is one")
        return torch.device("cpu")
    chosen = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(chosen)  # this rank's context, pinned memory and synchronisation on its own GPU only
    return chosen


def check_supported(cfg, device: torch.device) -> None:
    """What a device rank cannot run yet, as one line."""
    if device.type == "cpu":
        return
    if cfg.kernels == "compiled":
        raise UsageError(f"--kernels compiled runs on the CPU only; on {device.type} use --kernels torch "
                         "(the default there)")
    if cfg.average_every > 1:
        raise UsageError(f"--average-every > 1 runs on the CPU only; on {device.type} use --device cpu")


def describe(device: torch.device) -> str:
    """The device as the start-up line names it."""
    if device.type != "cuda":
        return device.type
    return f"{device} ({torch.cuda.get_device_name(device)})"


class Wire:
    """Collectives on this rank's tensors through `world`. `stage`: route tensors through the host
    buffer (the default for any device but the CPU; on the CPU only to test the route)."""

    def __init__(self, world, device: torch.device, stage: bool | None = None):
        self.world, self.device = world, torch.device(device)
        self.stage = self.device.type != "cpu" if stage is None else stage

    def host(self, like: torch.Tensor) -> torch.Tensor:
        """A host buffer of like's size and dtype, grown once to the largest asked for."""
        held = _HOST.get(like.dtype)
        if held is None or held.numel() < like.numel():
            held = torch.empty(like.numel(), dtype=like.dtype, pin_memory=torch.cuda.is_available())
            _HOST[like.dtype] = held
        return held[:like.numel()]

    def allreduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """t summed (or its max, min) over the ranks, in place; returns t."""
        return self._through(t, lambda arr: self.world.allreduce_(arr, op))

    def bcast_(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        """root's t on every rank, in place; returns t."""
        return self._through(t, lambda arr: self.world.bcast_(arr, root))

    def _through(self, t: torch.Tensor, collective) -> torch.Tensor:
        if not t.is_contiguous():
            raise ValueError("a collective needs a contiguous tensor: a copy would not be reduced in place")
        if not self.stage:
            collective(t.numpy())
            return t
        host = self.host(t.reshape(-1))
        host.copy_(t.reshape(-1))  # from a device: waits for the work that wrote t
        collective(host.numpy())
        t.reshape(-1).copy_(host)
        return t


def to_host(t: torch.Tensor, copy: bool = True):
    """t as a numpy array on the host: a view of a CPU tensor's memory unless `copy`; a device
    tensor's values copied."""
    if t.device.type != "cpu":
        return t.detach().cpu().numpy()
    return t.detach().numpy().copy() if copy else t.detach().numpy()
