"""Gradient compressors: one module per family, all behind the `Compressor` interface."""
from __future__ import annotations

from .base import REGISTRY, Compressor
from . import dense, lowrank, quantize  # noqa: F401  (each registers itself)


def names() -> list[str]:
    return sorted(REGISTRY)


def build(cfg, layout, world) -> Compressor:
    return REGISTRY[cfg.compressor](layout, world, cfg)
