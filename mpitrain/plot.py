"""Pictures of runs: `mpitrain plot RUN_DIR [RUN_DIR ...] [--out DIR]` (no MPI needed).

Reads each run's metrics.jsonl and config.json and writes, runs overlaid and labelled by
compressor:
    loss.png        training loss against steps, wall time and wire bytes
    eval.png        the eval metric (accuracy, or bits per character) against the same three
    step_time.png   step time against steps
Needs matplotlib (`pip install 'mpitrain[plot]'`). Exit codes: 0 written, 2 a usage mistake,
an unreadable run or matplotlib missing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import UsageError
from .metrics import check_folder

AXES = (("step", "steps"), ("elapsed_s", "wall time (s)"), ("wire_bytes_total", "wire bytes per rank"))


def read_run(run_dir: Path) -> dict:
    """A run's label and its train and eval lines."""
    metrics = run_dir / "metrics.jsonl"
    try:
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        config = json.loads((run_dir / "config.json").read_text())
    except FileNotFoundError as e:
        raise UsageError(f"{run_dir} is not a run dir ({Path(e.filename).name} missing)") from None
    except (ValueError, OSError) as e:
        raise UsageError(f"{run_dir}: unreadable metrics ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or not all(isinstance(x, dict) for x in lines):
        raise UsageError(f"{run_dir}: metrics.jsonl or config.json is not what mpitrain writes")
    return {"label": str(config.get("compressor", "?")), "dir": run_dir,
            "train": stitched([x for x in lines if x.get("kind") == "train" and not x.get("skipped")]),  # loss 0.0
            "eval": stitched([x for x in lines if x.get("kind") == "eval"])}


def stitched(records: list[dict]) -> list[dict]:
    """One curve through the runs that appended to a metrics file: a run resumed from a checkpoint
    before the last logged step replaces the records from its first step on, and its clock
    (elapsed_s, from 0 at each start) continues from the last record kept before it."""
    kept, offset, clock = [], 0.0, 0.0
    for x in records:
        if not isinstance(x.get("step"), int):
            continue
        while kept and kept[-1]["step"] >= x["step"]:
            kept.pop()
        x, t = dict(x), x.get("elapsed_s")
        if isinstance(t, (int, float)):
            if t < clock:  # a new run's clock
                offset = kept[-1].get("elapsed_s", 0.0) if kept else 0.0
            clock, x["elapsed_s"] = t, t + offset
        kept.append(x)
    return kept


def _labels(runs: list[dict]):
    """Label by compressor; where two runs share one, add the run dir's name."""
    seen = [r["label"] for r in runs]
    for r in runs:
        if seen.count(r["label"]) > 1:
            r["label"] = f"{r['label']} ({r['dir'].name})"


def _panel_row(plt, runs, kind: str, key: str, ylabel: str, path: Path, logy: bool = False):
    fig, axes = plt.subplots(1, len(AXES), figsize=(5 * len(AXES), 3.6))
    for ax, (x_key, x_label) in zip(axes, AXES):
        for i, r in enumerate(runs):  # one colour per run on every panel
            points = [(x[x_key], x[key]) for x in r[kind] if x_key in x and key in x]
            if points:
                ax.plot(*zip(*points), label=r["label"], lw=1.2, color=f"C{i}")
        ax.set_xlabel(x_label)
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(run_dirs: list[Path], out: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'mpitrain[plot]'") from None
    runs = [read_run(Path(d)) for d in run_dirs]
    _labels(runs)
    check_folder(str(out), "plot folder")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if any(r["train"] for r in runs):
        _panel_row(plt, runs, "train", "loss", "training loss", out / "loss.png", logy=True)
        written.append(out / "loss.png")
    metric = next((k for r in runs for x in r["eval"] for k in ("eval_accuracy", "eval_bpc") if k in x), None)
    if metric:
        _panel_row(plt, runs, "eval", metric, metric.replace("_", " "), out / "eval.png")
        written.append(out / "eval.png")
    if any("step_time_s" in x for r in runs for x in r["train"]):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for i, r in enumerate(runs):
            ax.plot([x["step"] for x in r["train"]], [x["step_time_s"] * 1e3 for x in r["train"]], label=r["label"],
                    color=f"C{i}")
        ax.set_xlabel("steps")
        ax.set_ylabel("step time (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "step_time.png", dpi=100)
        plt.close(fig)
        written.append(out / "step_time.png")
    if not written:
        raise UsageError("nothing to plot: the runs have no train or eval lines yet")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpitrain plot", description="PNGs of loss and eval metric against "
                                     "steps, wall time and wire bytes, runs overlaid (needs matplotlib).")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/plots of the first run)")
    parser.error = lambda message: (_ for _ in ()).throw(UsageError(message))
    try:
        args = parser.parse_args(argv)
        out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "plots"
        for path in plot([Path(d) for d in args.run_dirs], out):
            print(path)
        return 0
    except UsageError as e:
        print(f"mpitrain plot: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
