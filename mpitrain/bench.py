"""Benchmarks: `python -m mpitrain bench WHAT [--out DIR]`, run under mpiexec like training.

  allreduce   the trainer's dense aggregation path against a bare mpi4py Allreduce of the same
              bytes, interleaved in one run, for the default models.
  compress    per model and compressor (dense, greedylore, greedylore-paper, powersgd, random, lazy
              at r = 4, 8, 32): bytes counted on a refresh and on a compressed step, amortised
              over the refresh schedule; compressor time against one forward+backward; the
              paper's probe scores against the full projection. Models: the defaults and the
              layer shapes of a 125M transformer.
  convergence --jobs (digits MLP, mnist1d ResNet, the character LM at 600 or 3000 steps) trained
              to the end with each of --arms at --rank, same steps and seeds: final eval metric,
              wire bytes (without the measuring Allreduce), mean captured / captured_optimal,
              and convergence.png (eval metric against step and against bytes; needs matplotlib).
  checkpoint  a ~100 MB model (25M parameters, SGD momentum, greedylore bases and residuals): the
              checkpoint's write (fsync, rename) and load against a raw fsynced write and a read
              of as many bytes in the same run; the training stall a checkpoint costs, in steps.
  bytes-to-target   the paper's experiment: L2-regularised logistic regression on the bundled
              breast-cancer set (rows split across the ranks), compressed gradient descent with
              step 1/L, until ||x - x*||^2 / ||x0 - x*||^2 <= 1e-4: bytes to get there for fp32
              ("basic"), the best top-k, sparse dithering (det nu=0.1, rand omega=0.25), spherical
              (alpha=0.2), qsgd and natural; bytes-to-target.png (needs matplotlib).

Each writes WHAT-n<ranks>.json and .md into --out (rank 0) and prints the table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import torch

from . import compress, models
from .cli import Parser
from .config import Config
from .data import Dataset, locate
from .layout import GradLayout

DEFAULT_MODELS = (("mlp", "digits"), ("cnn", "digits"), ("transformer", "shakespeare"))


def _layout(model_name: str, dataset: str, seed: int = 0) -> GradLayout:
    torch.manual_seed(seed)
    return GradLayout(models.build(model_name, Dataset(locate(dataset)).info))


def _median_max(world, samples: np.ndarray) -> float:
    """Median over repeats of the slowest rank's time (a collective is as slow as its slowest rank)."""
    world.allreduce_(samples, op="max")
    return float(np.median(samples))


def bench_allreduce(world, repeats: int) -> list[dict]:
    rows = []
    for model_name, dataset in DEFAULT_MODELS:
        layout = _layout(model_name, dataset)
        cfg = Config(model=model_name, dataset=dataset, compressor="dense")
        dense = compress.build(cfg, layout, world)
        raw = layout.flat_np  # the very same memory: only the code path differs
        times = np.zeros((3, repeats))  # the trainer's path blocking, bare mpi4py, the trainer's path watched
        for i in range(-5, repeats):  # five warm-up rounds; the order rotates so none goes first always
            for which in np.roll([0, 1, 2], i):
                layout.flat.normal_()
                world.barrier()
                world.stall_timeout = Config.stall_timeout if which == 2 else 0.0
                t0 = world.wtime()
                world.raw_allreduce_(raw) if which == 1 else dense.aggregate(i)
                if i >= 0:
                    times[which, i] = world.wtime() - t0
        world.stall_timeout = 0.0
        trainer_s, raw_s, watched_s = (_median_max(world, t) for t in times)
        rows.append({"model": model_name, "ranks": world.size, "bytes": layout.flat.numel() * 4,
                     "trainer_median_s": trainer_s, "raw_mpi4py_median_s": raw_s,
                     "speed_ratio": raw_s / trainer_s, "watched_median_s": watched_s,
                     "watched_speed_ratio": raw_s / watched_s})
    return rows


LM_125M = {"vocab_size": 32000, "seq_len": 128, "d": 768, "layers": 12, "heads": 12, "ffn": 3072}
ARMS = [("dense", {}), *[(f"{name}-r{r}", {"compressor": c, "select": sel, "rank": r})
                          for r in (4, 8, 32)
                          for name, c, sel in (("greedylore", "greedylore", "greedy"),
                                               ("greedylore-paper", "greedylore-paper", "greedy"),
                                               ("powersgd", "powersgd", "greedy"),
                                               ("random", "greedylore-paper", "random"),
                                               ("lazy", "greedylore-paper", "lazy"))]]


def _fwd_bwd_case(name: str):
    """A model and one forward+backward closure at the default per-rank batch."""
    torch.manual_seed(0)
    if name == "transformer-125m":
        model = models.TransformerLM(**LM_125M)
        x = torch.randint(0, LM_125M["vocab_size"], (4, LM_125M["seq_len"]))
        y, task = torch.roll(x, -1, 1), "lm"
    else:
        ds = Dataset(locate(dict(DEFAULT_MODELS)[name]))
        model = models.build(name, ds.info)
        xs, ys = ds.rows("train", np.arange(32))
        x, y, task = torch.from_numpy(xs), torch.from_numpy(ys), ds.info["task"]
    layout = GradLayout(model)

    def fwd_bwd():
        layout.zero_grad()
        models.loss_and_metric(model(x), y, task)[0].backward()
    return layout, fwd_bwd


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_compress(world, repeats: int) -> list[dict]:
    rows = []
    for case in [m for m, _ in DEFAULT_MODELS] + ["transformer-125m"]:
        layout, fwd_bwd = _fwd_bwd_case(case)
        fwd_bwd_s = _timed(fwd_bwd, 2 if case.endswith("125m") else repeats)
        grads = layout.grads.clone()
        for arm, overrides in ARMS:
            cfg = dataclasses.replace(Config(), start_compress_step=0, **overrides)
            comp = compress.build(cfg, layout, world)
            refresh_every = getattr(comp, "refresh_every", 0)
            world.take_sent_bytes()

            def step(i):
                layout.grads.copy_(grads)
                t0 = time.perf_counter()
                comp.aggregate(i)
                return time.perf_counter() - t0
            first_s, first_bytes = step(0), world.take_sent_bytes()
            n = 2 if case.endswith("125m") else repeats
            step_s = float(np.median([step(1 + k) for k in range(n)]))
            step_bytes = world.take_sent_bytes() // n
            refreshes = refresh_every > 0  # a dense step + SVD every refresh_every steps
            amortised_bytes = (first_bytes + (refresh_every - 1) * step_bytes) / refresh_every if refreshes else step_bytes
            amortised_s = (first_s + (refresh_every - 1) * step_s) / refresh_every if refreshes else step_s
            rows.append({"model": case, "arm": arm, "params": layout.numel,
                         "compressed_matrices": len(getattr(comp, "slots", [])),
                         "directions": sum(getattr(comp, "r", [])),
                         "bytes_refresh_step": first_bytes if refreshes else None, "bytes_step": step_bytes,
                         "bytes_amortised": amortised_bytes, "dense_over_wire": layout.dense_bytes / amortised_bytes,
                         "compress_s_step": step_s, "refresh_s": first_s if refreshes else None,
                         "fwd_bwd_s": fwd_bwd_s, "compress_over_fwd_bwd": amortised_s / fwd_bwd_s})
    return rows


def bench_scores(world, repeats: int) -> list[dict]:
    """Probe-estimated energies, O(d D k + d^2 k), against the full projection U^T X, O(d^2 D)."""
    rows = []
    for case in [m for m, _ in DEFAULT_MODELS] + ["transformer-125m"]:
        layout, _ = _fwd_bwd_case(case)
        layout.grads.normal_()
        for r in (4, 32):
            timing = {}
            for scores in ("probe", "exact"):
                cfg = dataclasses.replace(Config(), compressor="greedylore-paper", rank=r, scores=scores,
                                          start_compress_step=0)
                comp = compress.build(cfg, layout, world)
                comp.aggregate(0)  # the refresh that makes the bases
                timing[scores] = _timed(lambda: comp.select(1), 2 if case.endswith("125m") else repeats)
            rows.append({"model": case, "rank": r, "probes": Config.probes, "probe_scores_s": timing["probe"],
                         "full_projection_s": timing["exact"], "speedup": timing["exact"] / timing["probe"]})
    return rows


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
                    "random": {"compressor": "greedylore-paper", "select": "random"},
                    "lazy": {"compressor": "greedylore-paper", "select": "lazy"}}


def bench_convergence(world, out: str, jobs: list[str], arms: list[str], rank: int = 4) -> list[dict]:
    from . import train
    rows = []
    for job in jobs:
        for arm in arms:
            settings, overrides = CONVERGENCE_JOBS[job], CONVERGENCE_ARMS[arm]
            cfg = dataclasses.replace(Config(), rank=rank, progress="never", log_every=10**9, resume="none",
                                      contraction_every=50 if arm != "dense" else 0,
                                      run_dir=os.path.join(out, "convergence", f"{job}-{arm}"), **settings, **overrides)
            run = train.prepare(cfg, world)
            train.resume(run, world)
            summary = train.train(run, world)
            metric = "eval_bpc" if "eval_bpc" in summary else "eval_accuracy"
            # the measuring Allreduce (contraction_every) is counted in wire bytes: take it out
            train_bytes = summary["wire_bytes_per_rank"] - _measuring_bytes(cfg.run_dir)
            captured = _mean_of(cfg.run_dir, "captured"), _mean_of(cfg.run_dir, "captured_optimal")
            rows.append({"job": job, "arm": arm, "rank": rank, "steps": cfg.steps, metric: summary[metric],
                         "wire_mb_per_rank": train_bytes / 1e6,
                         "dense_over_wire": summary["dense_bytes_per_rank"] / train_bytes,
                         "captured": captured[0], "captured_optimal": captured[1],
                         "wall_time_s": summary["wall_time_s"], "run_dir": cfg.run_dir})
    if world.rank == 0:
        _plot_convergence(rows, os.path.join(out, "convergence.png"))
    return rows


def _train_lines(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [x for x in map(json.loads, fh) if x["kind"] == "train"]


def _measuring_bytes(run_dir: str) -> int:
    """What the contraction measurements added: one dense Allreduce of the compressed matrices."""
    return sum(x.get("measuring_bytes", 0) for x in _train_lines(run_dir))


def _mean_of(run_dir: str, key: str) -> float | None:
    values = [x[key] for x in _train_lines(run_dir) if key in x]
    return float(np.mean(values)) if values else None


def _pyplot():
    """matplotlib's pyplot for files, or None (plots are optional: pip install matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("bench: matplotlib is not installed; plots skipped (pip install matplotlib)")
        return None


def _plot_convergence(rows: list[dict], path: str):
    plt = _pyplot()
    if plt is None:
        return
    jobs = list(dict.fromkeys(r["job"] for r in rows))
    fig, axes = plt.subplots(len(jobs), 2, figsize=(11, 4 * len(jobs)), squeeze=False)
    for row_axes, job in zip(axes, jobs):
        for r in (r for r in rows if r["job"] == job):
            with open(os.path.join(r["run_dir"], "metrics.jsonl")) as fh:
                evals = [e for e in map(json.loads, fh) if e["kind"] == "eval"]
            metric = "eval_bpc" if "eval_bpc" in evals[0] else "eval_accuracy"
            ys = [e[metric] for e in evals]
            row_axes[0].plot([e["step"] for e in evals], ys, marker=".", label=r["arm"])
            row_axes[1].plot([e["wire_bytes_total"] / 1e6 for e in evals], ys, marker=".", label=r["arm"])
        for ax, xlabel in zip(row_axes, ("step", "cumulative wire MB per rank")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric.replace("eval_", "eval "))
            ax.set_title(job)
            ax.grid(alpha=0.3)
            ax.legend()
        row_axes[1].set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
                          max_steps: int = 20000) -> list[dict]:
    """error_feedback "off" is the paper's plain compressed gradient descent; "auto" the product's."""
    a, y, mine, lam, x_star, smooth = logistic_problem(world)
    rows, curves = [], {}
    for arm, overrides in TARGET_ARMS.items():
        cfg = dataclasses.replace(Config(), error_feedback=error_feedback, **overrides)
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
                     "error_feedback": comp.error_feedback})
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
    plt = _pyplot()
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


def bench_checkpoint(world, out: str, repeats: int = 3) -> list[dict]:
    from . import checkpoint, train
    cfg = dataclasses.replace(Config(), model="mpitrain.bench:mlp_100mb", compressor="greedylore", steps=10 ** 6,
                              start_compress_step=0, run_dir=os.path.join(out, "checkpoint-run"), resume="none",
                              keep_last=1, progress="never")
    run = train.prepare(cfg, world)
    train.resume(run, world)
    step_s = _timed(lambda: (train.backward(run, 0), run.exchange.average(1), run.optimizer.step()), 3)
    nbytes = 4 * run.layout.numel
    saved = []
    save_s = _timed(lambda: saved.append(checkpoint.save(run, world, len(saved) + 1)), repeats)
    path = saved[-1]
    size = os.path.getsize(path) if world.rank == 0 else 0
    raw = os.path.join(out, "raw.bin")
    blob = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)  # the checkpoint's byte count

    def raw_write():
        with open(raw, "wb") as fh:
            fh.write(blob.tobytes())
            fh.flush()
            os.fsync(fh.fileno())
    raw_write_s = _timed(raw_write, repeats)
    read_s = _timed(lambda: checkpoint.load(path, run, world), repeats)
    verify_s = _timed(lambda: checkpoint.verify(path), repeats) if world.rank == 0 else 0.0
    raw_read_s = _timed(lambda: np.fromfile(raw, dtype=np.uint8), repeats)
    return [{"params": run.layout.numel, "model_mb": nbytes / 1e6, "file_mb": size / 1e6,
             "save_s": save_s, "raw_write_s": raw_write_s, "write_ratio": raw_write_s / save_s,
             "save_mb_per_s": size / 1e6 / save_s, "load_s": read_s, "verify_s": verify_s, "raw_read_s": raw_read_s,
             "read_ratio": raw_read_s / read_s, "step_s": step_s, "stall_steps": save_s / step_s}]


def mlp_100mb(info):
    """25M parameters (100 MB of fp32 weights) for the checkpoint benchmark."""
    return models.mlp(info, hidden=(4900, 4900))


GUARD_ARMS = {"off": {"stall_timeout": 0.0, "sync_check_every": 0},
              "watchdog": {"sync_check_every": 0},
              "watchdog+sync-check (defaults)": {},
              "sync-check every step": {"sync_check_every": 1}}


def bench_guard(world, out: str, repeats: int) -> list[dict]:
    """What the stall watchdog and the sync check cost on the default job: every arm `repeats`
    times, interleaved so that drifts in machine load fall on every arm alike; medians compared."""
    from . import train
    times, settings = {arm: [] for arm in GUARD_ARMS}, {}
    for i in range(repeats):
        for arm, overrides in GUARD_ARMS.items():
            cfg = dataclasses.replace(Config(), progress="never", log_every=10**9, resume="none",
                                      run_dir=os.path.join(out, "guard", f"{i}-{arm.split()[0]}"), **overrides)
            world.stall_timeout, settings[arm] = cfg.stall_timeout, (cfg.stall_timeout, cfg.sync_check_every)
            run = train.prepare(cfg, world)
            train.resume(run, world)
            times[arm].append(train.train(run, world)["wall_time_s"])
    world.stall_timeout = 0.0
    base = float(np.median(times["off"]))
    return [{"arm": arm, "stall_timeout_s": settings[arm][0], "sync_check_every": settings[arm][1],
             "median_wall_s": float(np.median(t)), "overhead_vs_off": float(np.median(t)) / base - 1,
             "runs": len(t)} for arm, t in times.items()]


def _markdown(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def parse(argv, world):
    parser = Parser(prog="mpitrain bench", description="Measure the trainer; see `python -m mpitrain bench --help`.")
    parser.quiet = world.rank != 0
    parser.add_argument("what", choices=["allreduce", "compress", "convergence", "checkpoint", "bytes-to-target",
                                         "guard"])
    parser.add_argument("--out", default="bench", help="folder for the JSON and Markdown results")
    parser.add_argument("--repeats", type=int, default=100, help="timed repetitions per case")
    parser.add_argument("--jobs", default="", help="convergence: comma-separated jobs (default digits-mlp,"
                        "shakespeare-transformer-600; also mnist1d-resnet, shakespeare-transformer: 3000 steps)")
    parser.add_argument("--arms", default="", help="convergence: comma-separated arms (default: all of "
                        + ", ".join(CONVERGENCE_ARMS) + ")")
    parser.add_argument("--rank", type=int, default=4, help="convergence: --rank of every low-rank arm")
    args = parser.parse_args(argv)
    args.jobs = _choose(parser, "job", args.jobs, CONVERGENCE_JOBS, ["digits-mlp", "shakespeare-transformer-600"])
    args.arms = _choose(parser, "arm", args.arms, CONVERGENCE_ARMS, list(CONVERGENCE_ARMS))
    return args


def _choose(parser, what: str, text: str, known: dict, default: list[str]) -> list[str]:
    names = [x for x in text.split(",") if x] or default
    unknown = [x for x in names if x not in known]
    if unknown:
        parser.error(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def main(args, world) -> int:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.local_size))
    os.makedirs(args.out, exist_ok=True)
    tables = {"allreduce": lambda: {"allreduce": bench_allreduce(world, args.repeats)},
              "compress": lambda: {"compress": bench_compress(world, args.repeats),
                                   "scores": bench_scores(world, args.repeats)},
              "convergence": lambda: {"convergence": bench_convergence(world, args.out, args.jobs, args.arms,
                                                                       args.rank)},
              "checkpoint": lambda: {"checkpoint": bench_checkpoint(world, args.out)},
              "guard": lambda: {"guard": bench_guard(world, args.out, min(args.repeats, 25))},
              "bytes-to-target": lambda: {f"error feedback {ef}": bench_bytes_to_target(world, args.out, ef)
                                          for ef in ("off", "auto")}}[args.what]()
    if world.rank == 0:
        stem = os.path.join(args.out, f"{args.what}-n{world.size}")
        with open(stem + ".json", "w") as fh:
            json.dump({"benchmark": args.what, "mpi": world.library_version(), "ranks": world.size,
                       "tables": tables}, fh, indent=2)
        text = "".join(f"\n### {name}\n\n" + _markdown(rows) for name, rows in tables.items())
        with open(stem + ".md", "w") as fh:
            fh.write(text)
        print(text, end="")
    return 0
