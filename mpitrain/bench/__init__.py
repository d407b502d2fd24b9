"""Benchmarks: `python -m mpitrain bench WHAT [--out DIR]`, run under mpiexec like training;
`python -m mpitrain bench --list` names them. One module per benchmark, shared helpers in common.py.

  allreduce   the trainer's dense aggregation path against a bare mpi4py Allreduce of the same
              bytes, interleaved in one run, for the default models; on several nodes of the
              same number of ranks (e.g. under `mpitrain emulate --ranks-per-node 2`) also a
              two-level sum: node reduce-scatter, network Allreduce, node allgather.
  compress    per model and compressor (dense, greedylore, greedylore-paper, powersgd, random, lazy
              at r = 4, 8, 32): bytes counted on a refresh and on a compressed step, amortised
              over the refresh schedule; compressor time against one forward+backward; the
              paper's probe scores against the full projection. Models: the defaults and the
              layer shapes of a 125M transformer.
  convergence --jobs (digits MLP, mnist1d ResNet, the character LM at 600 or 3000 steps) trained
              to the end with each of --arms at --rank, same steps and seeds: final eval metric,
              wire bytes (without the measuring Allreduce), mean captured / captured_optimal,
              and convergence.png (eval metric against step, bytes and exchange rounds; needs
              matplotlib). Parameter averaging arms (NAME-hH: H local steps per round, nesterov
              outer step; `--arms averaging` runs H = 1, 4, 16, 64 with dense and greedylore) add
              rounds and the MB to reach the every-step dense arm's final metric.
  checkpoint  a ~100 MB model (25M parameters, SGD momentum, greedylore bases and residuals): the
              checkpoint's write (fsync, rename) and load against a raw fsynced write and a read
              of as many bytes in the same run; the training stall a checkpoint costs, in steps.
  bytes-to-target   the paper's experiment: L2-regularised logistic regression on the bundled
              breast-cancer set (rows split across the ranks), compressed gradient descent with
              step 1/L, until ||x - x*||^2 / ||x0 - x*||^2 <= 1e-4: bytes to get there for fp32
              ("basic"), the best top-k, sparse dithering (det nu=0.1, rand omega=0.25), spherical
              (alpha=0.2), qsgd and natural; bytes-to-target.png (needs matplotlib).

  guard       the default job with the stall watchdog and the sync check off, on, and checking
              every step: median wall time and overhead against off.

  peer        the default job through torch DDP on gloo, with and without PowerSGD's hook,
              against our dense, powersgd and greedylore, at N = 2 and 4 (run it without mpiexec:
              it launches both) or at the launched N: median step time, final accuracy.

  quantizers  the default job with sparse-dither and qsgd through the gather and the sharded exchange
              (--quantizer-exchange), against dense, at N = 4 and 16 (run it without mpiexec: it
              launches both) or at the launched N: wall time over dense's, values decoded a rank a
              step over d, bytes, final accuracy beside the gather arm's.

  network     time to accuracy on an emulated cluster (root; run without mpiexec): 4 nodes x 1 rank
              at 0.1, 1 and 10 Gbit/s links and on shared memory, for the wide MLP and the 600-step
              LM: our dense, powersgd, greedylore, parameter averaging, auto, and torch DDP with and
              without PowerSGD's hook: wall time to the dense arm's final metric, step time, bytes,
              the alpha-beta model's prediction beside the measured step; network.png.

  hierarchy   --hierarchy node against flat (root; run without mpiexec): each low-rank compressor's
              work a step on one rank, flat against the slowest node share at 2 and 4 ranks a node;
              and on emulated clusters (--layouts, default 2x2,4x2; --links, default 1gbit), the
              wide-MLP job (--jobs: also the 600-step LM) with dense, powersgd and greedylore, flat and
              node: time to accuracy, step time, the bytes a node hands the network.

  project     an alpha-beta model of step time at 8..1024 ranks and 1..400 Gb/s for the default
              models and 125M / 1.3B transformer shapes, from this machine's measured compute,
              compression time, bytes and collectives per step: tables and a PNG of speedup over
              dense (its assumptions are in mpitrain/bench/project.py).

  gpu         on a GPU machine (run without mpiexec: it launches 1 and 2 ranks sharing the GPU):
              a 125M transformer's forward+backward, exchange and step for dense, powersgd and
              greedylore at r = 4 and 8, beside torch DDP with and without PowerSGD's hook; and
              the CUDA tests. Without CUDA, a small transformer on the CPU: a dry run of the code.

Each writes WHAT-n<ranks>.json, .md, .csv (one per table) and .png (when matplotlib is there)
into --out (rank 0) and prints the table.
"""
from __future__ import annotations

import importlib
import os

import torch

from ..config import Parser
from ..emulate import parse_rate
from ..metrics import check_folder
from .convergence import AVERAGING_ARMS, CONVERGENCE_ARMS, CONVERGENCE_JOBS
from .hierarchy import HIERARCHY_ARMS
from .network import LINKS, NETWORK_ARMS, NETWORK_JOBS
from .overlap import OVERLAPPING
from .common import write_tables

MODULES = ("allreduce", "compress", "convergence", "checkpoint", "target", "guard", "peer", "project", "overlap",
           "network", "hierarchy", "gpu", "quantizers")


def benchmarks() -> dict:
    """name -> module, in the order --list shows them."""
    found = [importlib.import_module(f".{m}", __name__) for m in MODULES]
    return {mod.NAME: mod for mod in found}


def parse(argv, world):
    known = benchmarks()
    parser = Parser(prog="mpitrain bench", description="Measure the trainer; `mpitrain bench --list` names the "
                    "benchmarks.")
    parser.quiet = world.rank != 0
    parser.add_argument("what", nargs="?", choices=list(known))
    parser.add_argument("--list", action="store_true", help="name every benchmark with one line on what it measures")
    parser.add_argument("--out", default="bench", help="folder for the JSON, Markdown, CSV and PNG results")
    parser.add_argument("--repeats", type=int, default=100, help="timed repetitions per case")
    parser.add_argument("--jobs", default="", help="convergence: comma-separated jobs (default digits-mlp,"
                        "shakespeare-transformer-600; also mnist1d-resnet, shakespeare-transformer: 3000 steps); network: "
                        "wide-mlp, shakespeare-transformer-600 (both by default); hierarchy: the same (default wide-mlp)")
    parser.add_argument("--arms", default="", help="convergence: comma-separated arms of "
                        + ", ".join(CONVERGENCE_ARMS) + " (default: those without -h; 'averaging' stands for "
                        + ",".join(AVERAGING_ARMS) + "); hierarchy: compressors (default dense,powersgd,greedylore)")
    parser.add_argument("--rank", type=int, default=4, help="convergence: --rank of every low-rank arm")
    parser.add_argument("--steps", type=int, default=0, help="convergence, peer: steps per job (0: the job's own; "
                        "fewer for a quick look, not for figures); gpu: timed steps per arm (0: 10)")
    parser.add_argument("--seeds", default="", help="convergence: comma-separated seeds, each job and arm trained "
                        "once per seed, their mean and spread tabled (default: the job's own seed, once)")
    parser.add_argument("--links", default=",".join(LINKS), help="network, hierarchy: comma-separated link rates "
                        "of the emulated clusters (default " + ",".join(LINKS) + "; hierarchy: 1gbit)")
    parser.add_argument("--layouts", default="2x2,4x2", help="hierarchy: emulated clusters, NODESxRANKS each")
    parser.add_argument("--quantizer-exchange", default="auto", choices=("auto", "sharded", "gather"),
                        help="bytes-to-target: the quantizers' exchange (auto: sharded from 4 ranks on)")
    parser.add_argument("--compressors", default="dense", help="overlap: comma-separated compressors whose "
                        "exchange (dense), first round (powersgd, greedylore) or encoding (quantizers) overlaps backward")
    args = parser.parse_args(argv)
    if not args.list and not args.what:
        parser.error("name a benchmark (mpitrain bench --list shows them)")
    for flag, least in (("repeats", 1), ("rank", 1), ("steps", 0)):
        if getattr(args, flag) < least:
            parser.error(f"--{flag} must be >= {least}; got {getattr(args, flag)}")
    if not args.list:
        check_folder(args.out, "--out")
    args.seeds = _seeds(parser, args.seeds)
    layouts = [x.split("x") for x in args.layouts.split(",") if x]
    if not all(len(x) == 2 and all(v.isdigit() and int(v) > 0 for v in x) for x in layouts):
        parser.error(f"--layouts takes NODESxRANKS separated by commas, e.g. 2x2,4x2; got {args.layouts!r}")
    args.layouts = [(int(a), int(b)) for a, b in layouts]
    if args.what == "hierarchy" and args.links == ",".join(LINKS):
        args.links = "1gbit"
    if args.what in ("network", "hierarchy"):
        args.jobs = _choose(parser, "job", args.jobs, NETWORK_JOBS,
                            list(NETWORK_JOBS) if args.what == "network" else ["wide-mlp"])
        args.arms = _choose(parser, "arm", args.arms, NETWORK_ARMS, list(NETWORK_ARMS)) if args.what == "network" \
            else _choose(parser, "compressor", args.arms, dict.fromkeys(HIERARCHY_ARMS), ["dense", "powersgd", "greedylore"])
        args.links = [x for x in args.links.split(",") if x]
        for link in args.links:
            parse_rate(link)
    else:
        args.jobs = _choose(parser, "job", args.jobs, CONVERGENCE_JOBS, ["digits-mlp", "shakespeare-transformer-600"])
        args.arms = _choose(parser, "arm", args.arms.replace("averaging", ",".join(AVERAGING_ARMS)),
                            CONVERGENCE_ARMS, [arm for arm in CONVERGENCE_ARMS if "-h" not in arm])
    args.compressors = _choose(parser, "compressor", args.compressors, dict.fromkeys(OVERLAPPING), ["dense"])
    return args


def _seeds(parser, text: str) -> list[int]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not all(x.isdigit() for x in names) or len(set(names)) != len(names):
        parser.error(f"--seeds takes distinct non-negative integers separated by commas; got {text!r}")
    return [int(x) for x in names]


def _choose(parser, what: str, text: str, known: dict, default: list[str]) -> list[str]:
    names = [x for x in text.split(",") if x] or default
    unknown = [x for x in names if x not in known]
    if unknown:
        parser.error(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def main(args, world) -> int:
    known = benchmarks()
    if args.list:
        if world.rank == 0:
            for name, mod in known.items():
                print(f"{name:16} {mod.ABOUT}")
        return 0
    torch.set_num_threads(world.cores_per_rank())
    os.makedirs(args.out, exist_ok=True)
    module = known[args.what]
    tables = module.run(world, args)
    if world.rank == 0:
        print(write_tables(args.out, args.what, world, tables, getattr(module, "png", None)), end="")
    return 0
