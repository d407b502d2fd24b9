"""Time to accuracy on an emulated cluster: each arm trained over links of 0.1, 1 and 10 Gbit/s.

    python -m mpitrain bench network --out bench [--links 0.1gbit,1gbit,10gbit] [--jobs wide-mlp,...]
    (as root, without mpiexec: it makes each cluster with `mpitrain emulate`'s Cluster and launches the arms)

Every arm of every job runs to the end on 4 nodes x 1 rank at each link, and once on shared memory
(the same 4 ranks and cores, no network): our dense, powersgd r4, greedylore r4, parameter averaging
every 16 steps (dense, and greedylore at rank 16), auto, and torch DDP on gloo with and without
PowerSGD's hook (rank 4) over the same links. Per arm and link: wall time to the target (the sum of
step times up to the first evaluation at the dense arm's final metric, within 0.01 accuracy or 0.05
bpc; evaluations are not counted), median step time and the share of it spent waiting on the exchange,
bytes sent per rank, the final metric, the step against the same arm's on shared memory, and the
step `bench project`'s alpha-beta model predicts from the shared-memory step and the bytes.
network.png: the metric against wall time, one panel per job and link. A run that finished into
--out before is used again (a long bench can be run a link or a job at a time); delete its folder
under --out/network to measure it again.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np

from .. import api
from ..config import Config
from ..emulate import Cluster, mpiexec_path, parse_rate
from .common import launch_env, pyplot
from .convergence import CONVERGENCE_ARMS, LM
from .peer import ddp_train
from .project import allreduce_s

NAME = "network"
ABOUT = "time to accuracy on emulated 0.1/1/10 Gbit/s links (root): our arms, auto and torch DDP +/- PowerSGD"
NODES = 4
LINKS = ("0.1gbit", "1gbit", "10gbit")
NETWORK_JOBS = {
    # 1.1M parameters: at 1 Gbit/s on 4 nodes its dense exchange is ~80% of its step (README)
    "wide-mlp": {"model": "wide-mlp", "eval_every": 10},
    "shakespeare-transformer-600": {**LM, "steps": 600, "eval_every": 25},
}
NETWORK_ARMS = {"dense": {}, "powersgd": {"compressor": "powersgd"}, "greedylore": {"compressor": "greedylore"},
                "dense-h16": CONVERGENCE_ARMS["dense-h16"],
                "greedylore-h16-r16": CONVERGENCE_ARMS["greedylore-h16-r16"], "auto": {"compressor": "auto"},
                "ddp-dense": {}, "ddp-powersgd": {}}
TOLERANCE = {"eval_accuracy": 0.01, "eval_bpc": 0.05}


def job_config(job: str, arm: str, run_dir: str, steps: int = 0) -> Config:
    overrides = dict(NETWORK_ARMS[arm])
    factor = overrides.pop("inner_lr_factor", 1.0)
    cfg = dataclasses.replace(Config(), **{"progress": "never", "log_every": 1, "resume": "none", "run_dir": run_dir,
                                           **NETWORK_JOBS[job], **overrides})
    cfg.steps, cfg.lr = steps or cfg.steps, cfg.lr * factor
    return cfg


def flags(cfg: Config) -> list[str]:
    """The command's flags for every field that differs from the default."""
    default = Config()
    return [f"--{k.replace('_', '-')}={v}" for k, v in dataclasses.asdict(cfg).items()
            if v != getattr(default, k) and not isinstance(v, bool)]


# -- one arm, on the ranks ----------------------------------------------------------------------

def ddp_worker(spec: dict):
    """An arm of torch DDP over the same links, on the ranks; rank 0 writes its metrics.jsonl."""
    world = api.init()
    cfg = job_config(spec["job"], spec["arm"], spec["run_dir"], spec["steps"])
    api.set_threads(world, cfg.threads)
    lines = ddp_train(world, cfg, spec["arm"] == "ddp-powersgd")
    if world.rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "metrics.jsonl"), "w") as fh:
            fh.writelines(json.dumps(x) + "\n" for x in lines)


def _launch(cluster: Cluster | None, argv: list[str], timeout: float = 1800):
    env = launch_env()
    if cluster is None:
        done = subprocess.run([mpiexec_path(), "-n", str(NODES), sys.executable, *argv], env=env,
                              capture_output=True, text=True, timeout=timeout)
    else:
        job = cluster.popen(argv, env=cluster.env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = job.communicate(timeout=timeout)
        done = SimpleNamespace(returncode=job.returncode, stderr=err)
    if done.returncode != 0:
        raise RuntimeError(f"bench network: {' '.join(argv[:6])}... failed: {done.stderr.strip()[-2000:]}")


def _finished(run_dir: str) -> list[dict] | None:
    """The metrics of a run that ended (ours write a summary, DDP's arm its file at the end), else None."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
            lines = [json.loads(x) for x in fh]
    except (OSError, ValueError):
        return None
    return lines if lines and lines[-1]["kind"] in ("summary", "eval") else None


def run_arm(cluster: Cluster | None, job: str, arm: str, out: str, steps: int) -> dict:
    where = "shm" if cluster is None else f"{cluster.link_bps / 1e9:g}gbit"
    run_dir = os.path.join(out, "network", f"{job}-{where}-{arm}")
    lines = _finished(run_dir)
    if lines is not None and (steps or job_config(job, arm, run_dir).steps) == \
            sum(x["kind"] == "train" for x in lines):
        print(f"bench network: {job} {where} {arm}: the finished run in {run_dir} is used again (delete it "
              "to measure again)", flush=True)
        return {"job": job, "arm": arm, "link": where, "run_dir": run_dir, "lines": lines}
    shutil.rmtree(run_dir, ignore_errors=True)  # a run cut short: its metrics would be appended to
    if arm.startswith("ddp"):
        spec = json.dumps({"job": job, "arm": arm, "run_dir": run_dir, "steps": steps})
        _launch(cluster, ["-m", "mpitrain.bench.network", spec])
    else:
        _launch(cluster, ["-m", "mpitrain", *flags(job_config(job, arm, run_dir, steps))])
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        lines = [json.loads(x) for x in fh]
    return {"job": job, "arm": arm, "link": where, "run_dir": run_dir, "lines": lines}


# -- figures --------------------------------------------------------------------------------------

def summarize(runs: list[dict], achieved: dict) -> list[dict]:
    rows = []
    for r in runs:
        train_lines = [x for x in r["lines"] if x["kind"] == "train"]
        evals = [x for x in r["lines"] if x["kind"] == "eval"]
        metric = "eval_bpc" if "eval_bpc" in evals[-1] else "eval_accuracy"
        elapsed = np.cumsum([x["step_time_s"] for x in train_lines])  # steps only: evaluations left out
        waits = [x["exchange_s"] for x in train_lines if "exchange_s" in x]
        step = float(np.median([x["step_time_s"] for x in train_lines[20:]]))
        summary = next((x for x in r["lines"] if x["kind"] == "summary"), {})
        choice = next((x["choice"] for x in r["lines"] if x["kind"] == "compressor_choice"), None)
        rows.append({"job": r["job"], "link": r["link"], "achieved_gbps": achieved.get(r["link"]), "arm": r["arm"],
                     "wall_s": float(elapsed[-1]), "median_step_ms": step * 1e3,
                     "exchange_share": float(np.median(waits[20:])) / step if waits else None,
                     "mb_per_rank": summary.get("wire_bytes_per_rank", 0) / 1e6 if summary else None,
                     "median_step_bytes": float(np.median([x["wire_bytes"] for x in train_lines[20:]]))
                     if "wire_bytes" in train_lines[-1] else None, "metric": metric, "final": evals[-1][metric], "choice": choice, "steps": len(train_lines),
                     "run_dir": r["run_dir"], "curve": curve(r["lines"])})
    for row in rows:
        same = {r["arm"]: r for r in rows if r["job"] == row["job"] and r["link"] == row["link"]}
        shm = next((r for r in rows if r["job"] == row["job"] and r["link"] == "shm" and r["arm"] == row["arm"]), None)
        # auto's prediction starts from the shared-memory step of the arm it chose on this link
        base = next((r for r in rows if r["job"] == row["job"] and r["link"] == "shm" and r["arm"] == row["choice"]),
                    shm) if row["choice"] else shm
        dense, psgd = same.get("dense"), same.get("powersgd")
        target = dense["final"] + (TOLERANCE[row["metric"]] if row["metric"] == "eval_bpc"
                                   else -TOLERANCE[row["metric"]]) if dense else None
        row["target"] = target
        row["to_target_s"] = _first(row["curve"], target, row["metric"])
        row["to_powersgd_final_s"] = _first(row["curve"], psgd["final"], row["metric"]) if psgd else None
        row["step_over_shm"] = row["median_step_ms"] / shm["median_step_ms"] if shm else None
        if shm and row["link"] != "shm" and row["median_step_bytes"] is not None:
            gbps = achieved.get(row["link"]) or float(row["link"].replace("gbit", ""))
            per_step = row["median_step_bytes"]  # a compressed step's (or a local step's), not the mean
            predicted = base["median_step_ms"] / 1e3 + allreduce_s(per_step, NODES, gbps)
            row["predicted_step_ms"] = predicted * 1e3
            row["prediction_error"] = predicted * 1e3 / row["median_step_ms"] - 1
    for row in rows:
        fastest = [r["to_target_s"] for r in rows if r["job"] == row["job"] and r["link"] == row["link"]
                   and r["arm"] in ("dense", "greedylore") and r["to_target_s"] is not None]
        row["to_target_over_best"] = row["to_target_s"] / min(fastest) if fastest and row["to_target_s"] else None
        for peer in ("dense", "ddp-powersgd"):
            other = next((r for r in rows if r["job"] == row["job"] and r["link"] == row["link"] and r["arm"] == peer),
                         None)
            row[f"to_target_over_{peer}"] = row["to_target_s"] / other["to_target_s"] \
                if other and other["to_target_s"] and row["to_target_s"] else None
    return rows


def curve(lines: list[dict]) -> list[tuple[float, float]]:
    """(wall time of the steps so far, metric) at each evaluation."""
    elapsed = np.cumsum([x["step_time_s"] for x in lines if x["kind"] == "train"])
    evals = [x for x in lines if x["kind"] == "eval"]
    metric = "eval_bpc" if "eval_bpc" in evals[-1] else "eval_accuracy"
    return [(float(elapsed[e["step"] - 1]), e[metric]) for e in evals]


def _first(curve: list, target: float | None, metric: str) -> float | None:
    if target is None:
        return None
    better = (lambda v: v <= target + 1e-12) if metric == "eval_bpc" else (lambda v: v >= target - 1e-12)
    return next((t for t, v in curve if better(v)), None)


def png(tables: dict, path: str):
    plt = pyplot()
    rows = tables["network"]
    panels = list(dict.fromkeys((r["job"], r["link"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (job, link) in zip(axes[0], panels):
        for i, r in enumerate(r for r in rows if (r["job"], r["link"]) == (job, link)):
            with open(os.path.join(r["run_dir"], "metrics.jsonl")) as fh:
                t, v = zip(*curve([json.loads(x) for x in fh]))
            ax.plot(t, v, marker=".", ms=3, color=f"C{i}", label=r["arm"])
        ax.set_xscale("log")
        ax.set_xlabel("wall time of the steps (s)")
        ax.set_ylabel(rows[0]["metric"].replace("eval_", "eval "))
        ax.set_title(f"{job}, {link}, {NODES} nodes", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(world, args) -> dict:
    if world.size != 1:
        raise RuntimeError("bench network launches its own ranks: run it without mpiexec (as root)")
    runs, achieved = [], {}
    for link in ["shm", *args.links]:
        cluster = None if link == "shm" else Cluster(NODES, 1, parse_rate(link))
        if cluster is not None:
            cluster.__enter__()
        try:
            if cluster is not None:
                rates = cluster.measure()
                achieved[f"{cluster.link_bps / 1e9:g}gbit"] = float(np.mean(rates)) / 1e9
            for job in args.jobs:
                for arm in args.arms:
                    runs.append(run_arm(cluster, job, arm, args.out, args.steps))
                    print(f"bench network: {job} {link} {arm} done", flush=True)
        finally:
            if cluster is not None:
                cluster.__exit__(None, None, None)
    return {"network": [{k: v for k, v in r.items() if k != "curve"} for r in summarize(runs, achieved)]}


if __name__ == "__main__":
    ddp_worker(json.loads(sys.argv[1]))
