"""The paper's experiment: bytes for compressed gradient descent to reach a target accuracy."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from .. import compress
from ..config import Config
from ..data import Dataset, locate
from ..layout import GradLayout
from .common import pyplot

NAME = "bytes-to-target"
ABOUT = "logistic regression to ||x - x*||^2 <= 1e-4 ||x0 - x*||^2: bytes per quantizer"


TARGET_ARMS = {
    "basic (fp32)": {"compressor": "dense"},
    **{f"topk k={k}": {"compressor": "topk", "ratio": k / 31} for k in (1, 2, 4, 8, 16)},
    "sparse-dither det nu=0.1": {"compressor": "sparse-dither", "nu": 0.1, "dither": "det"},
    "sparse-dither rand omega=0.25": {"compressor": "sparse-dither", "nu": 0.25, "dither": "rand"},
    "spherical alpha=0.2": {"compressor": "spherical", "alpha": 0.2, "block": 8},
    "qsgd s=4": {"compressor": "qsgd", "levels": 4},
    "natural": {"compressor": "natural"},
}


def logistic_problem(world, lam: float = 1e-2):
    """(A, y, this rank's rows, lambda, x*, L) for L2-regularised logistic regression."""
    ds = Dataset(locate("breast_cancer"))
    x_tr, y_tr = ds.rows("train", np.arange(ds.n_train))
    x_te, y_te = ds.rows("test", np.arange(ds.n_test))
    a = np.hstack([np.vstack([x_tr, x_te]).astype(np.float64), np.ones((ds.n_train + ds.n_test, 1))])
    y = np.where(np.concatenate([y_tr, y_te]) == 1, 1.0, -1.0)
    x = np.zeros(a.shape[1])
    for _ in range(50):  # Newton's method, float64: x* to machine precision
        s = 1 / (1 + np.exp(y * (a @ x)))
        grad = -(a.T @ (y * s)) / len(y) + lam * x
        hess = (a.T * (s * (1 - s))) @ a / len(y) + lam * np.eye(a.shape[1])
        x -= np.linalg.solve(hess, grad)
    smooth = np.linalg.eigvalsh(a.T @ a / len(y)).max() / 4 + lam
    return a, y, np.arange(world.rank, len(y), world.size), lam, x, smooth


def bench_bytes_to_target(world, out: str, error_feedback: str, target: float = 1e-4,
                          max_steps: int = 20000, quantizer_exchange: str = "auto") -> list[dict]:
    """error_feedback "off" is the paper's plain compressed gradient descent; "auto" the product's."""
    a, y, mine, lam, x_star, smooth = logistic_problem(world)
    rows, curves = [], {}
    for arm, overrides in TARGET_ARMS.items():
        cfg = dataclasses.replace(Config(), error_feedback=error_feedback, quantizer_exchange=quantizer_exchange,
                                  **overrides)
        holder = torch.nn.Module()
        holder.x = torch.nn.Parameter(torch.zeros(a.shape[1]))
        layout = GradLayout(holder)
        comp = compress.build(cfg, layout, world)
        x = np.zeros(a.shape[1])
        start = float(np.sum((x - x_star) ** 2))
        wire = codec_bits = 0
        curve = [(0, 0, 1.0)]
        world.take_sent_bytes()
        for step in range(max_steps):
            s = 1 / (1 + np.exp(y[mine] * (a[mine] @ x)))  # this rank's share of the full gradient
            share = -(a[mine].T @ (y[mine] * s)) / len(y) + lam * x / world.size
            layout.grads.copy_(torch.from_numpy(share))
            comp.aggregate(step)
            x -= layout.grads.numpy().astype(np.float64) / smooth
            wire += world.take_sent_bytes()
            codec_bits += comp.stats.get("payload_bits", 32 * a.shape[1] if cfg.compressor == "dense" else 0)
            error = float(np.sum((x - x_star) ** 2)) / start
            curve.append((wire, codec_bits / 8, error))
            if error <= target or not np.isfinite(error):
                break
        reached = error <= target
        curves[arm] = curve
        rows.append({"arm": arm, "ranks": world.size, "reached": reached, "steps": step + 1,
                     "final_error": error, "wire_bytes_to_target": wire if reached else None,
                     "codec_bytes_to_target": codec_bits / 8 if reached else None,
                     "error_feedback": comp.error_feedback,
                     "exchange": {True: "sharded", False: "gather"}.get(getattr(comp, "sharded", None), "-")})
    basic = rows[0]
    topks = [r for r in rows if r["arm"].startswith("topk") and r["reached"]]
    best = min(topks, key=lambda r: r["wire_bytes_to_target"]) if topks else None
    for r in rows:
        r["best_topk"] = best is not None and r is best
        for key in ("wire_bytes_to_target", "codec_bytes_to_target"):
            if r[key]:
                r[key.replace("_to_target", "") + "_vs_basic"] = basic[key] / r[key]
    if world.rank == 0:
        _plot_target(curves, [r["arm"] for r in rows if not r["arm"].startswith("topk") or r is best],
                     os.path.join(out, f"bytes-to-target-n{world.size}-ef-{error_feedback}.png"), target,
                     f"{world.size} rank(s), error feedback {error_feedback}")
    return rows


def _plot_target(curves: dict, arms: list[str], path: str, target: float, title: str):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm in arms:
        wire, codec, error = zip(*curves[arm])
        axes[0].semilogy(wire, error, label=arm)
        axes[1].semilogy(codec, error, label=arm)
    for ax, xlabel in zip(axes, ("bytes on the wire per rank (comm.py, framing included)",
                                 "codec bytes per rank (the paper's accounting)")):
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("||x - x*||^2 / ||x0 - x*||^2")
        ax.set_title(f"logistic regression, breast cancer, {title}", fontsize=9)
        ax.set_ylim(target / 10, 2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(world, args) -> dict:
    return {f"error feedback {ef}": bench_bytes_to_target(world, args.out, ef, quantizer_exchange=args.quantizer_exchange)
            for ef in ("off", "auto")}
