"""mpitrain: MPI data-parallel training of PyTorch models with compressed gradients.

The command is `python -m mpitrain`; the library for your own training loop is

    init, Exchange, Averaged, save_checkpoint, load_checkpoint, Resumed, request_stop, set_threads,
    wait_for_checkpoints, default_run_dir
    ShardedBatches, ArrayData, TorchData, batch_for

(see mpitrain/api.py). `import mpitrain` loads none of them, nor torch or mpi4py, until one is used;
MPI starts only in `init()`.
"""
from __future__ import annotations

import importlib

__version__ = "0.3.0"

_EXPORTS = {**{name: "api" for name in ("init", "Exchange", "Averaged", "Diverged", "save_checkpoint",
                                        "load_checkpoint", "Resumed", "request_stop", "set_threads",
                                        "wait_for_checkpoints", "default_run_dir")},
            **{name: "data" for name in ("ShardedBatches", "ArrayData", "TorchData", "batch_for")}}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'mpitrain' has no attribute {name!r}")
