"""Gradient compressors: one module per family, all behind the `Compressor` interface (base.py).

The table names each compressor's family module, which is imported when one of its compressors is
built: the command checks (and lists) a name before any rank imports torch, which at scale, from
a shared filesystem, can take minutes.
"""
from __future__ import annotations

import importlib

FAMILY = {"dense": "dense", "auto": "auto", "powersgd": "lowrank.powersgd",
          **dict.fromkeys(["greedylore", "greedylore-paper"], "lowrank.greedylore"),
          **dict.fromkeys(["sparse-dither", "qsgd", "natural", "topk", "randk", "spherical"], "quantize")}


def names() -> list[str]:
    return sorted(FAMILY)


def compressor_class(name: str):
    importlib.import_module(f".{FAMILY[name]}", __name__)  # the family registers its classes
    from .base import REGISTRY
    return REGISTRY[name]


def build(cfg, layout, world):
    """The compressor cfg names, on `layout`'s device, or (for those that run on the CPU only) on a
    host twin of it; across the nodes of a two-level exchange when --hierarchy asks for it."""
    cls = compressor_class(cfg.compressor)
    from .hierarchy import NodeSharded, wanted
    if wanted(cfg, layout, world):
        return NodeSharded(cls, layout, world, cfg)
    if layout.device.type != "cpu" and not cls.on_device:
        from .host import OnHost
        return OnHost(cls, layout, world, cfg)
    return cls(layout, world, cfg)
