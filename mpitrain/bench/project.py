"""Step time at 8..1024 ranks and 1..400 Gb/s, projected from what this machine measures.

    python -m mpitrain bench project --out bench        (one process: it measures, then models)

Measured here, in this run, per model (the default models, a 125M transformer's shapes):
forward+backward of one rank's batch, each compressor's time per step (at one rank, where its
collectives cost nothing) and the bytes it hands to its collectives per step (refreshes
amortised), and how many collectives it calls per step. The 1.3B shapes (d 2048, 24 layers, FFN
8192, vocab 50k) are too large to run here: their compute and compression time are the 125M
figures scaled by the parameter count, and their bytes are the 125M ratio of each compressor's
bytes to PowerSGD's formula, applied to the 1.3B formula (4 r (n + m) per compressed matrix, 4 per
value for the rest; the shapes come from the meta device, nothing allocated).

The model (stated, not measured):
  ring Allreduce of B bytes on N ranks   2 (N-1) alpha + 2 (N-1)/N * B / bandwidth
  ring Allgatherv of b bytes per rank    (N-1) alpha + (N-1) b / bandwidth
  step = compute + compression + every collective, one after the other (no overlap; the
  exchange today starts after backward); alpha = ALPHA_S per message hop; one rank per node,
  each node the speed of this machine's core(s); parameter averaging (-h16) pays its exchange once
  every 16 steps plus a 12-byte Allreduce every step.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .. import compress, models
from ..config import Config
from .common import pyplot, timed
from .compress import LM_125M, _fwd_bwd_case

NAME = "project"
ABOUT = "alpha-beta projection of step time at 8..1024 ranks, 1..400 Gb/s, from this machine's measurements"
LM_1_3B = {"vocab_size": 50000, "seq_len": 128, "d": 2048, "layers": 24, "heads": 16, "ffn": 8192}
RANKS = (8, 32, 128, 512, 1024)
GBPS = (1, 10, 25, 100, 200, 400)
ALPHA_S = 5e-6
ARMS = {"dense": {}, "powersgd": {"compressor": "powersgd"}, "greedylore": {"compressor": "greedylore"}}
EVERY = 16  # the parameter-averaging arms


def _matrix_shapes(spec: dict) -> list[tuple]:
    with torch.device("meta"):
        model = models.TransformerLM(**spec)
    return [tuple(p.shape) for p in model.parameters()]


def _powersgd_formula(shapes, rank: int, rate: float) -> float:
    total = 0.0
    for shape in shapes:
        n, m = shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1
        low_rank = len(shape) >= 2 and (n + m) * rank * rate < n * m
        total += 4 * rank * (n + m) if low_rank else 4 * n * m
    return total


def measure(world, repeats: int) -> list[dict]:
    """Per model and compressor: compute, compression time, bytes and collectives per step."""
    found = []
    for case in ("mlp", "cnn", "transformer", "transformer-125m"):
        layout, fwd_bwd = _fwd_bwd_case(case)
        heavy = case.endswith("125m")
        compute_s = timed(fwd_bwd, 2 if heavy else repeats)
        grads = layout.grads.clone()
        for arm, overrides in ARMS.items():
            cfg = dataclasses.replace(Config(), start_compress_step=0, **overrides)
            comp = compress.build(cfg, layout, world)

            def step(i):
                layout.grads.copy_(grads)
                comp.aggregate(i)
            step(0)  # a refresh (greedylore-paper) or the first power step: not the steady state
            world.take_sent_bytes()
            calls0, n = world.calls, 2 if heavy else max(3, repeats // 10)
            seconds = timed(lambda: step(1), n)
            found.append({"model": case, "arm": arm, "params": layout.numel, "compute_s": compute_s,
                          "compress_s": 0.0 if arm == "dense" else seconds,
                          "bytes": world.take_sent_bytes() / n, "collectives": (world.calls - calls0) / n})
    big = {r["arm"]: r for r in found if r["model"] == "transformer-125m"}
    shapes_125m, shapes_13b = _matrix_shapes(LM_125M), _matrix_shapes(LM_1_3B)
    params_13b = sum(math.prod(s) for s in shapes_13b)
    formula = {name: _powersgd_formula(shapes, Config.rank, Config.min_compression_rate)
               for name, shapes in (("125m", shapes_125m), ("1.3b", shapes_13b))}
    scale = params_13b / big["dense"]["params"]
    for arm, row in big.items():
        bytes_13b = 4 * params_13b if arm == "dense" else row["bytes"] / formula["125m"] * formula["1.3b"]
        found.append({**row, "model": "transformer-1.3b (scaled)", "params": params_13b,
                      "compute_s": row["compute_s"] * scale, "compress_s": row["compress_s"] * scale,
                      "bytes": bytes_13b})
    return found


def allreduce_s(nbytes: float, ranks: int, gbps: float) -> float:
    return 2 * (ranks - 1) * ALPHA_S + 2 * (ranks - 1) / ranks * nbytes * 8 / (gbps * 1e9)


def project(measured: list[dict]) -> list[dict]:
    rows = []
    for m in measured:
        for every in (1, EVERY):
            arm = m["arm"] if every == 1 else f"{m['arm']}-h{every}"
            for ranks in RANKS:
                for gbps in GBPS:
                    # the compressor's collectives carry its bytes; latency counted per collective
                    exchange = allreduce_s(m["bytes"], ranks, gbps) + (m["collectives"] - 1) * 2 * (ranks - 1) * ALPHA_S
                    if every > 1:
                        exchange = (exchange + m["compress_s"]) / every + allreduce_s(12, ranks, gbps)
                    else:
                        exchange += m["compress_s"]
                    rows.append({"model": m["model"], "arm": arm, "ranks": ranks, "gbps": gbps,
                                 "compute_s": m["compute_s"], "exchange_s": exchange,
                                 "step_s": m["compute_s"] + exchange})
    dense = {(r["model"], r["ranks"], r["gbps"]): r["step_s"] for r in rows if r["arm"] == "dense"}
    for r in rows:
        r["speedup_vs_dense"] = dense[(r["model"], r["ranks"], r["gbps"])] / r["step_s"]
    return rows


def png(tables: dict, path: str):
    plt = pyplot()
    rows = tables["project"]
    models_ = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models_), figsize=(4.2 * len(models_), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models_):
        for i, arm in enumerate(dict.fromkeys(r["arm"] for r in rows)):
            for ranks, style in ((8, ":"), (128, "-"), (1024, "--")):
                pts = [r for r in rows if r["model"] == model and r["arm"] == arm and r["ranks"] == ranks]
                ax.plot([r["gbps"] for r in pts], [r["speedup_vs_dense"] for r in pts], style, color=f"C{i}",
                        label=f"{arm}" if ranks == 128 else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("Gb/s per rank")
        ax.set_title(f"{model}\n(: 8 ranks, - 128, -- 1024)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("projected speedup over dense")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(world, args) -> dict:
    measured = measure(world, args.repeats)
    return {"measured": measured, "project": project(measured)}
