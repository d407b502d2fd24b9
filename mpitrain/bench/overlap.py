"""Overlapping the exchange with backward (--bucket-mb) against exchanging after it.

    mpiexec -n 2 python -m mpitrain bench overlap --out bench [--compressors dense,powersgd,greedylore]

A stack of Linear(WIDTH, WIDTH) layers sized so that its exchange takes about as long as its
backward on this machine. Interleaved repeats of: forward+backward alone, the exchange alone (one
Allreduce of every gradient), today's step (backward, then the exchange) and the overlapped step
(each bucket's Allreduce started by the hooks as backward finishes it); medians of the slowest
rank. The figure to read: overlapped step / max(backward, exchange) (1.0 = perfect overlap; the
sequential step is about 2.0 when the two are equal). For powersgd and greedylore the exchange is
the whole compressed step, and what overlaps backward is its first round; for the quantizers it
is the step's encoding (on a worker thread, --overlap-encoding on), and their exchange runs after
backward.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from .. import api

NAME = "overlap"
ABOUT = "exchange overlapped with backward (--bucket-mb) against after it: step / max(backward, exchange)"
WIDTH, BATCH = 1024, 64
OVERLAPPING = ("dense", "powersgd", "greedylore", "sparse-dither", "qsgd", "natural", "topk", "spherical")


def _model(layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(WIDTH, WIDTH), nn.Tanh())])


def bench_overlap(world, repeats: int, compressor: str = "dense", layers: int = 12, bucket_mb: float = 4.0) -> list[dict]:
    api.set_threads(world)
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(world.rank))
    # greedylore's fp32 sketch: the round that can start in backward (the 16-bit one agrees its scales first)
    knobs = dict(start_compress_step=0, sketch_bits=32)
    arms = {"sequential": api.Exchange(_model(layers), world, compressor, bucket_mb=0, **knobs),
            "overlapped": api.Exchange(_model(layers), world, compressor, bucket_mb=bucket_mb, overlap_encoding="on",
                                       **knobs)}  # measured, whatever the cores
    times = {k: [] for k in ("backward", "exchange", "sequential", "overlapped")}

    def backward(exchange):
        exchange.zero_grad()
        exchange.model(x).square().mean().backward()  # plain backward: no hooks armed

    for i in range(repeats + 2):
        for what in times:
            exchange = arms["overlapped" if what == "overlapped" else "sequential"]
            if what == "exchange":
                backward(exchange)
            world.barrier()
            t0 = time.perf_counter()
            if what == "backward":
                backward(exchange)
            elif what == "exchange":
                exchange.average(i, torch.zeros(()))
            else:
                exchange.zero_grad()
                exchange.backward(exchange.model(x).square().mean())
                exchange.average(i)
            if i >= 2:  # two warm-up rounds
                times[what].append(time.perf_counter() - t0)
    med = {}
    for what, samples in times.items():
        arr = np.array(samples)
        world.allreduce_(arr, op="max")
        med[what] = float(np.median(arr))
    slowest = max(med["backward"], med["exchange"])
    return [{"compressor": compressor, "ranks": world.size, "params": arms["sequential"].layout.numel,
             "buckets": len(arms["overlapped"].compressor.buckets), "bucket_mb": bucket_mb,
             "backward_s": med["backward"], "exchange_s": med["exchange"], "sequential_step_s": med["sequential"],
             "overlapped_step_s": med["overlapped"], "sequential_over_max": med["sequential"] / slowest,
             "overlapped_over_max": med["overlapped"] / slowest,
             "overlapped_over_sequential": med["overlapped"] / med["sequential"]}]


def run(world, args) -> dict:
    return {"overlap": [row for compressor in args.compressors
                        for row in bench_overlap(world, min(args.repeats, 30), compressor)]}
