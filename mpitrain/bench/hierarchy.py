"""The two-level exchange (--hierarchy node) against the flat one.

    python -m mpitrain bench hierarchy --out bench [--links 1gbit]   # as root, without mpiexec
    (--links "": the compression work alone, no cluster and no root needed)

Compute: each compressor's work a step on one rank, flat (every matrix) against the slowest of a
node's shares at 2 and 4 ranks a node (the compressor built over the share alone, as each rank of
the two-level exchange builds it), in this process, over the refresh schedule's steps, on the
wide MLP and the character LM.

Time: on emulated clusters of 2 nodes x 2 ranks and 4 nodes x 2 ranks at each --links rate, each
of --jobs (default the wide-MLP job: 300 steps, evaluated every 10; also the 600-step LM, whose
8 ranks on 2 cores take long: --layouts 2x2) with dense, powersgd r4 and greedylore r4, flat and
node: wall time to the target (flat dense's final metric within 0.01 accuracy or 0.05 bpc; the sum
of the step times up to the first evaluation at or past it), median step, the bytes a node hands
MPI for the network a step (node: what its ranks sent across, counted; flat: its ranks' bytes),
what each node's link really carried out (its interface's counter over the whole run, start-up and
evaluations included, a node's mean, over the steps), and the final metric. A finished run under
--out is used again.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import torch

from .. import compress, models
from ..compress.hierarchy import shares
from ..config import Config
from ..data import Dataset, locate
from ..emulate import Cluster, parse_rate
from ..layout import GradLayout
from .network import NETWORK_JOBS, TOLERANCE, _finished, _first, _launch, curve, flags

NAME = "hierarchy"
ABOUT = "--hierarchy node against flat: compression compute per rank; time to accuracy on emulated nodes of 2 ranks"
# every compressor but auto (which measures the flat exchange); --arms picks (default dense, powersgd, greedylore)
HIERARCHY_ARMS = ("dense", "powersgd", "greedylore", "greedylore-paper", "sparse-dither", "qsgd", "natural", "topk",
                  "randk", "spherical")
COMPUTE_MODELS = (("wide-mlp", "digits"), ("transformer", "shakespeare"))
COMPUTE_STEPS = 40


def compute(world, model_name: str, dataset: str) -> list[dict]:
    """ms a step of each low-rank compressor's `aggregate` on this rank alone, flat and per share."""
    torch.manual_seed(0)
    rows = []
    for name in ("powersgd", "greedylore"):
        cfg = dataclasses.replace(Config(), compressor=name, bucket_mb=0.0, hierarchy="flat", model=model_name)
        layout = GradLayout(models.build(model_name, Dataset(locate(dataset)).info))
        grads = torch.randn(COMPUTE_STEPS, layout.numel, generator=torch.Generator().manual_seed(0))

        def per_step(part, compressor) -> float:
            spent = 0.0
            for step in range(COMPUTE_STEPS):
                part.grads.copy_(grads[step, layout.slots[0].offset:][:part.numel])
                t0 = time.perf_counter()
                compressor.aggregate(step)
                spent += time.perf_counter() - t0
            return spent / COMPUTE_STEPS * 1e3
        cls = compress.compressor_class(name)
        flat = per_step(layout, cls(layout, world, cfg))
        row = {"model": model_name, "compressor": name, "flat_ms": flat}
        for k in (2, 4):
            cut = shares(layout.slots, k)
            parts = [layout.part(a, b) for a, b in cut]
            row[f"slowest_of_{k}_ms"] = max(per_step(p, cls(p, world, cfg)) for p in parts)
            row[f"slowest_of_{k}_over_flat"] = row[f"slowest_of_{k}_ms"] / flat
        rows.append(row)
    return rows


def run_arm(cluster: Cluster, job: str, arm: str, hierarchy: str, out: str, steps: int) -> dict:
    where = f"{cluster.nodes}x{cluster.ranks_per_node}-{cluster.link_bps / 1e9:g}gbit"
    run_dir = os.path.join(out, "hierarchy", f"{where}-{arm}-{hierarchy}" if job == "wide-mlp" else
                           f"{job}-{where}-{arm}-{hierarchy}")
    cfg = dataclasses.replace(Config(), progress="never", log_every=1, resume="none", run_dir=run_dir,
                              compressor=arm, hierarchy=hierarchy, **NETWORK_JOBS[job])
    cfg.steps = steps or cfg.steps
    lines, counted = _finished(run_dir), os.path.join(run_dir, "link_bytes.json")
    if lines is None or sum(x["kind"] == "train" for x in lines) != cfg.steps or not os.path.exists(counted):
        before = cluster.sent_bytes()
        _launch(cluster, ["-m", "mpitrain", *flags(cfg)])
        with open(counted, "w") as fh:  # what each node's link carried out during the whole run
            json.dump([b - a for a, b in zip(before, cluster.sent_bytes())], fh)
        lines = _finished(run_dir)
    with open(counted) as fh:
        link = float(np.mean(json.load(fh))) / cfg.steps
    train, evals = [x for x in lines if x["kind"] == "train"], [x for x in lines if x["kind"] == "eval"]
    metric = "eval_bpc" if "eval_bpc" in evals[-1] else "eval_accuracy"
    flat_network = cluster.ranks_per_node * float(np.median([x["wire_bytes"] for x in train[20:]]))
    return {"job": job, "layout": where, "arm": arm, "hierarchy": hierarchy, "curve": curve(lines), "metric": metric,
            "median_step_ms": float(np.median([x["step_time_s"] for x in train[20:]])) * 1e3,
            "node_network_bytes": float(np.median([x["node_network_bytes"] for x in train[20:]]))
            if hierarchy == "node" else flat_network, "link_bytes_per_step": link,
            "final": evals[-1][metric]}


def summarize(runs: list[dict]) -> list[dict]:
    for r in runs:
        same = {(x["arm"], x["hierarchy"]): x for x in runs if (x["job"], x["layout"]) == (r["job"], r["layout"])}
        slack = TOLERANCE[r["metric"]] if r["metric"] == "eval_bpc" else -TOLERANCE[r["metric"]]
        r["target"] = same[("dense", "flat")]["final"] + slack if ("dense", "flat") in same else None
        r["to_target_s"] = _first(r["curve"], r["target"], r["metric"])
        flat = same[(r["arm"], "flat")]
        r["network_bytes_over_flat"] = r["node_network_bytes"] / flat["node_network_bytes"]
        r["link_bytes_over_flat"] = r["link_bytes_per_step"] / flat["link_bytes_per_step"]
        r["to_target_over_flat"] = r["to_target_s"] / flat["to_target_s"] \
            if r["to_target_s"] and flat["to_target_s"] else None
    return [{k: v for k, v in r.items() if k != "curve"} for r in runs]


def run(world, args) -> dict:
    if world.size != 1:
        raise RuntimeError("bench hierarchy launches its own ranks: run it without mpiexec (as root)")
    tables = {"compute": [row for m, d in COMPUTE_MODELS for row in compute(world, m, d)]}
    runs = []
    for link in args.links:
        for nodes, per_node in args.layouts:
            with Cluster(nodes, per_node, parse_rate(link)) as cluster:
                for job in args.jobs:
                    for arm in args.arms:
                        for hierarchy in ("flat", "node"):
                            runs.append(run_arm(cluster, job, arm, hierarchy, args.out, args.steps))
                            print(f"bench hierarchy: {job} {nodes}x{per_node} {link} {arm} {hierarchy} done",
                                  flush=True)
    if runs:
        tables["time"] = summarize(runs)
    return tables
