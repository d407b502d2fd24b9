"""Shared randomness, from one place: every random draw that ranks must agree on (or that a resume
must repeat) comes from a stream keyed by (seed, step, slot, purpose), so it needs no
communication and no generator state in a checkpoint."""
from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

from .base import kernels


class Purpose(IntEnum):
    """What a stream is for; its number is part of the key, so two purposes never share draws."""
    PROBE = 1             # greedylore's Gaussian probes
    RANDOM_SELECT = 2     # greedylore --select random: which directions
    POWER_INIT = 3        # powersgd's starting Q
    RANDK = 4             # rand-k's coordinates
    AVERAGING_SIGNS = 5   # parameter averaging's count sketch of the deltas


def _key(seed: int, step: int, slot: int, purpose: Purpose) -> list[int]:
    return [int(seed), int(step), int(slot), int(purpose)]


def torch_stream(seed: int, step: int, slot: int, purpose: Purpose, compiled: bool = False) -> torch.Generator:
    """A torch generator for the key, the same on every rank and after a resume. `compiled`: its
    seed from `seed_state` (the same words), for callers that load the compiled loops anyway."""
    key = _key(seed, step, slot, purpose)
    state = seed_state(*key)[0] if compiled else np.random.SeedSequence(key).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> 1))


def draw_normal(out: torch.Tensor, stream: torch.Generator) -> None:
    """out = standard normal draws from a host stream: randn's own values (it is normal_ on a new
    tensor), in out's memory when that is contiguous host memory, else drawn on the host and copied
    (the same draws on any device)."""
    if out.device.type == "cpu" and out.is_contiguous():
        out.normal_(generator=stream)
    else:
        out.copy_(torch.randn(out.shape, generator=stream))


def rounding_key(seed: int, rank: int, step: int, slot: int, *part: int) -> int:
    """The Philox key of one rank's stochastic rounding of one tensor (or of a `part` of it): the one
    stream that is not shared, since each rank rounds its own values independently."""
    return int(seed_state(seed, rank, step, slot, *part)[0])


def seed_state(*entropy: int, words: int = 1) -> np.ndarray:
    """np.random.SeedSequence(entropy).generate_state(words, np.uint64), the same words, from a
    compiled loop (the quantizers' kernels, which load numba): numpy's takes ~30 us a key."""
    split = []  # each int as numpy splits it: 32-bit words, low first; 0 is one word
    for n in map(int, entropy):
        if n < 0:
            raise ValueError(f"a seed's words are non-negative, not {n}")
        split.append(n & 0xFFFFFFFF)
        while n > 0xFFFFFFFF:
            n >>= 32
            split.append(n & 0xFFFFFFFF)
    state = np.empty(words, dtype=np.uint64)
    kernels().seed_sequence(np.array(split, dtype=np.uint64), np.empty(4, dtype=np.uint64), state)
    return state


def numpy_stream(seed: int, step: int, slot: int, purpose: Purpose) -> np.random.Generator:
    """A numpy generator for the key."""
    return np.random.default_rng(_key(seed, step, slot, purpose))


_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (the compiled loops' `_mix`): a counter-based
    generator is this applied to its counters, and the bases' checksum weighs by it."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))
