"""Jobs trained to the end with each arm: final metric, wire bytes, captured energy, plots."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from .. import train
from ..config import Config
from .common import fresh_run_dir, pyplot

NAME = "convergence"
ABOUT = "--jobs trained to the end with each of --arms: final metric against wire bytes"


LM = {"model": "transformer", "dataset": "shakespeare", "optimizer": "adam", "lr": 3e-3, "batch_size": 16,
      "eval_every": 100, "warmup_steps": 30}
CONVERGENCE_JOBS = {
    "digits-mlp": {},
    "mnist1d-resnet": {"model": "resnet", "dataset": "mnist1d", "steps": 600, "lr": 0.02},
    "shakespeare-transformer": {**LM, "steps": 3000},
    "shakespeare-transformer-600": {**LM, "steps": 600, "eval_every": 50},
}
# greedylore (16- or 32-bit factors) at --rank r spends the bytes powersgd spends at rank r: equal
# bytes. greedylore-paper and powersgd send the literal rank r: equal rank.
CONVERGENCE_ARMS = {"dense": {}, "powersgd": {"compressor": "powersgd"},
                    "greedylore-paper": {"compressor": "greedylore-paper"},
                    "greedylore": {"compressor": "greedylore"},
                    "greedylore-fp32": {"compressor": "greedylore", "factor_bits": 32},
                    "greedylore-s32": {"compressor": "greedylore", "sketch_bits": 32},
                    "random": {"compressor": "greedylore-paper", "select": "random"},
                    "lazy": {"compressor": "greedylore-paper", "select": "lazy"},
                    # parameter averaging: H local steps, then the deltas averaged through the compressor
                    # and a nesterov outer step (lr 1, momentum 0.5) with twice the job's inner learning
                    # rate: what the 600-step search in the README found; "-dil": DiLoCo's 0.7 / 0.9 at
                    # the job's learning rate; "-avg": plain averaging
                    **{f"{name}-h{h}": {**({"compressor": name} if name != "dense" else {}), "average_every": h,
                                        "outer_optimizer": "nesterov", "outer_lr": 1.0, "outer_momentum": 0.5,
                                        "inner_lr_factor": 2.0}
                       for name in ("dense", "greedylore") for h in (4, 8, 16, 64)},
                    # deltas of Adam steps are of higher rank than gradients: 4x the directions, and
                    # compression from the 3rd round, still >= 50x fewer bytes than every-step dense
                    "greedylore-h16-r16": {"compressor": "greedylore", "average_every": 16,
                                           "outer_optimizer": "nesterov", "outer_lr": 1.0, "outer_momentum": 0.5,
                                           "inner_lr_factor": 2.0, "rank": 16, "start_compress_step": 2},
                    "dense-h16-dil": {"average_every": 16, "outer_optimizer": "nesterov", "outer_lr": 0.7,
                                      "outer_momentum": 0.9},
                    # the outer step's defaults against the README's advice, one part at a time
                    "dense-h8-dil": {"average_every": 8, "outer_optimizer": "nesterov", "outer_lr": 0.7,
                                     "outer_momentum": 0.9},
                    "dense-h8-lr1": {"average_every": 8, "outer_optimizer": "nesterov", "outer_lr": 1.0,
                                     "outer_momentum": 0.5},
                    "dense-h16-avg": {"average_every": 16, "outer_optimizer": "average"}}
AVERAGING_ARMS = ["dense", "dense-h4", "dense-h16", "dense-h64", "greedylore", "greedylore-h4", "greedylore-h16",
                  "greedylore-h64", "greedylore-h16-r16"]


def bench_convergence(world, out: str, jobs: list[str], arms: list[str], rank: int = 4, steps: int = 0,
                      seeds: list[int] | None = None) -> list[dict]:
    """One row per job, arm and seed (`seeds`: None for the job's own seed, its run folders unsuffixed)."""
    rows = []
    for job in jobs:
        for arm in arms:
            for seed in seeds or [None]:
                rows.append(_train_arm(world, out, job, arm, rank, steps, seed))
    _bytes_to_dense_final(rows)
    if world.rank == 0:
        _plot_convergence(rows, os.path.join(out, "convergence.png"))
    return rows


def _train_arm(world, out: str, job: str, arm: str, rank: int, steps: int, seed: int | None) -> dict:
    settings, overrides = CONVERGENCE_JOBS[job], dict(CONVERGENCE_ARMS[arm])
    factor = overrides.pop("inner_lr_factor", 1.0)
    cfg = dataclasses.replace(Config(), **{
        "rank": rank, "progress": "never", "log_every": 10**9, "resume": "none",
        "contraction_every": 50 if overrides.get("compressor", "dense") != "dense"
        and "average_every" not in overrides else 0,
        "run_dir": os.path.join(out, "convergence", f"{job}-{arm}" + ("" if seed is None else f"-s{seed}")),
        **settings, **overrides, **({} if seed is None else {"seed": seed})})
    cfg.steps, cfg.lr = steps or cfg.steps, cfg.lr * factor
    fresh_run_dir(world, cfg.run_dir)
    run = train.prepare(cfg, world)
    train.resume(run, world)
    summary = train.train(run, world)
    metric = _metric(summary)
    # the measuring Allreduce (contraction_every) is counted in wire bytes: take it out
    train_bytes = summary["wire_bytes_per_rank"] - _measuring_bytes(cfg.run_dir)
    captured = _mean_of(cfg.run_dir, "captured"), _mean_of(cfg.run_dir, "captured_optimal")
    return {"job": job, "arm": arm, "seed": cfg.seed, "rank": cfg.rank, "steps": cfg.steps, "lr": cfg.lr,
            "average_every": cfg.average_every,
            "rounds": _rounds(cfg), metric: summary[metric], "wire_mb_per_rank": train_bytes / 1e6,
            "dense_over_wire": summary["dense_bytes_per_rank"] / train_bytes,
            "captured": captured[0], "captured_optimal": captured[1],
            "wall_time_s": summary["wall_time_s"], "run_dir": cfg.run_dir}


def across_seeds(rows: list[dict]) -> list[dict]:
    """Per job and arm, over its seeds: the metric's mean, sample standard deviation and range, and
    its difference from the dense arm of the same seed (paired: the seeds move every arm together,
    so a claim between arms rests on the spread of the differences, not of the metrics)."""
    summary = []
    for job, arm in dict.fromkeys((r["job"], r["arm"]) for r in rows):
        mine = [r for r in rows if r["job"] == job and r["arm"] == arm]
        metric = _metric(mine[0])
        values = np.array([r[metric] for r in mine])
        dense = {r["seed"]: r[metric] for r in rows if r["job"] == job and r["arm"] == "dense"}
        gaps = np.array([r[metric] - dense[r["seed"]] for r in mine if r["seed"] in dense])
        reached = [r["mb_to_dense_final"] for r in mine if r["mb_to_dense_final"] is not None]
        summary.append({"job": job, "arm": arm, "seeds": len(mine), "metric": metric,
                        "mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                        "min": float(values.min()), "max": float(values.max()),
                        "minus_dense_mean": float(gaps.mean()) if len(gaps) else None,
                        "minus_dense_sd": float(gaps.std(ddof=1)) if len(gaps) > 1 else None,
                        "wire_mb_per_rank": float(np.mean([r["wire_mb_per_rank"] for r in mine])),
                        "reached_dense_final": len(reached),
                        "mb_to_dense_final_mean": float(np.mean(reached)) if reached else None})
    return summary


def _metric(result: dict) -> str:
    """The job's final metric: bits per character for a language model, else accuracy."""
    return "eval_bpc" if "eval_bpc" in result else "eval_accuracy"


def _rounds(cfg) -> int:
    """Exchange rounds: one per step, or one per H steps with parameter averaging (and one at the end)."""
    return -(-cfg.steps // cfg.average_every)


def _bytes_to_dense_final(rows: list[dict]):
    """Per row: the wire MB per rank at its first evaluation as good as the final one of the every-step
    dense arm of its seed (None when it never got there, or when no dense arm ran)."""
    for row in rows:
        dense = next((r for r in rows if (r["job"], r["arm"], r["seed"]) == (row["job"], "dense", row["seed"])), None)
        row["mb_to_dense_final"] = None
        if dense is None:
            continue
        metric = _metric(row)
        better = (lambda v: v <= dense[metric]) if metric == "eval_bpc" else (lambda v: v >= dense[metric])
        reached = [e for e in _lines(row["run_dir"], "eval") if better(e[metric])]
        if reached:
            row["mb_to_dense_final"] = reached[0]["wire_bytes_total"] / 1e6


def _lines(run_dir: str, kind: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [x for x in map(json.loads, fh) if x["kind"] == kind]


def _exchange_lines(run_dir: str) -> list[dict]:
    """The lines that carry the compressor's report: train lines, or round lines with parameter averaging."""
    return _lines(run_dir, "train") + _lines(run_dir, "round")


def _measuring_bytes(run_dir: str) -> int:
    """What the contraction measurements added: one dense Allreduce of the compressed matrices."""
    return sum(x.get("measuring_bytes", 0) for x in _exchange_lines(run_dir))


def _mean_of(run_dir: str, key: str) -> float | None:
    values = [x[key] for x in _exchange_lines(run_dir) if key in x]
    return float(np.mean(values)) if values else None


def _plot_convergence(rows: list[dict], path: str):
    plt = pyplot()
    if plt is None:
        return
    jobs = list(dict.fromkeys(r["job"] for r in rows))
    fig, axes = plt.subplots(len(jobs), 3, figsize=(16, 4 * len(jobs)), squeeze=False)
    for row_axes, job in zip(axes, jobs):
        for r in (r for r in rows if r["job"] == job):
            evals = _lines(r["run_dir"], "eval")
            metric = _metric(evals[0])
            ys = [e[metric] for e in evals]
            label = r["arm"] + (f" seed {r['seed']}" if len({x["seed"] for x in rows}) > 1 else "")
            row_axes[0].plot([e["step"] for e in evals], ys, marker=".", label=label)
            row_axes[1].plot([e["wire_bytes_total"] / 1e6 for e in evals], ys, marker=".", label=label)
            row_axes[2].plot([-(-e["step"] // r["average_every"]) for e in evals], ys, marker=".", label=label)
        for ax, xlabel in zip(row_axes, ("step", "cumulative wire MB per rank", "exchange rounds")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric.replace("eval_", "eval "))
            ax.set_title(job)
            ax.grid(alpha=0.3)
            ax.legend()
        row_axes[1].set_xscale("log")
        row_axes[2].set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(world, args) -> dict:
    rows = bench_convergence(world, args.out, args.jobs, args.arms, args.rank, args.steps, args.seeds or None)
    return {"convergence": rows, **({"across_seeds": across_seeds(rows)} if len(args.seeds) > 1 else {})}
