"""The run configuration: one table of fields, resolved from defaults < file < env < CLI.

Each field is a TOML key (`batch_size` or `batch-size`), a flag (`--batch-size`) and an
environment variable (`MPITRAIN_BATCH_SIZE`). Every value is checked for type and range here,
so a user's mistake becomes one clear line (`UsageError`), never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import os
import re
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone

ENV_PREFIX = "MPITRAIN_"
NOT_SETTINGS = {"MPITRAIN_NODE"}  # set by `mpitrain emulate` for comm.World, not a configuration field


class UsageError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""

    exit_code = 2  # also when one rank meets it mid-run (see comm.World.abort_on_exception)

    def __init__(self, message: str, notes: list[str] = ()):
        super().__init__(message)
        self.notes = list(notes)  # lines to print before it (what was tried on the way)


class CannotWrite(RuntimeError):
    """What the run writes could not be written (no space, no permission, an I/O error, parameters
    that are not finite): one line, exit 1; what was written before is left as it was."""

    exit_code = 1


@contextlib.contextmanager
def one_line(caught, error, say):
    """An exception of the types `caught` raised inside becomes `error(say(it))`: one line from the
    abort hook or the command, never a traceback."""
    try:
        yield
    except caught as e:
        raise error(say(e)) from None


class Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as UsageError and prints help on one rank only."""

    quiet = False

    def error(self, message):
        raise UsageError(message)

    def _print_message(self, message, file=None):
        if not self.quiet:
            super()._print_message(message, file)


def user_function(spec: str, what: str):
    """The callable a `package.module:function` names (a user's model or dataset)."""
    module_name, func_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"cannot import {what} module {module_name!r}: {e}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UsageError(f"{module_name} has no function {func_name!r}")
    return fn


def _f(default, help, choices=None, minimum=None):
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum})


@dataclass
class Config:
    # what to train
    model: str = _f("mlp", "model: mlp, wide-mlp, cnn, resnet, transformer, or package.module:function")
    dataset: str = _f("digits", "bundled dataset (digits, breast_cancer, mnist1d, shakespeare), a path to an .h5 "
                                "file, or package.module:function returning (arrays or a torch Dataset, info)")
    data_dir: str = _f("", "folder of the bundled datasets (default: the project's data/)")
    steps: int = _f(300, "optimizer steps to run", minimum=1)
    batch_size: int = _f(0, "samples per rank per (micro-)batch (0: 32, or fewer when the data holds less than one "
                            "global batch; the start-up line says which)", minimum=0)
    # optimizer
    optimizer: str = _f("sgd", "optimizer", choices=("sgd", "adam", "adamw"))
    lr: float = _f(0.05, "peak learning rate", minimum=0.0)
    momentum: float = _f(0.9, "SGD momentum (Adam: beta1)", minimum=0.0)
    weight_decay: float = _f(0.0, "weight decay", minimum=0.0)
    warmup_steps: int = _f(20, "linear learning-rate warm-up steps", minimum=0)
    lr_schedule: str = _f("cosine", "after warm-up: constant, or cosine decay to 10%", choices=("constant", "cosine"))
    grad_clip: float = _f(0.0, "clip the agreed gradient to this 2-norm after the exchange, every rank alike "
                               "(error feedback keeps what was sent); 0: off", minimum=0.0)
    accumulate: int = _f(1, "micro-batches of --batch-size per optimizer step: gradients are accumulated and "
                            "exchanged once a step, on the last micro-batch's backward", minimum=1)
    seed: int = _f(0, "seed for initialisation, data order and every shared random draw", minimum=0)
    # exchange
    compressor: str = _f("dense", "gradient compressor; auto: dense or greedylore, "
                                  "whichever this job's first steps measure to be faster (with --average-every > 1: "
                                  "dense)")
    error_feedback: str = _f("auto", "keep what compression left out and add it to the next step (EF14): "
                                     "auto (on for biased compressors), on, off", choices=("auto", "on", "off"))
    bucket_mb: float = _f(25.0, "overlap the exchange with backward: gradients go in buckets of this many MB, each "
                                "exchanged as soon as backward has finished it (dense; powersgd and greedylore: their "
                                "first round; quantizers: see --overlap-encoding; "
                                "0: one exchange after backward)", minimum=0.0)
    overlap_encoding: str = _f("auto", "quantizers with --bucket-mb: encode each bucket on a worker thread while "
                                       "backward runs: auto (when this rank has a core its torch threads leave "
                                       "free, e.g. --threads below its share), on, off", choices=("auto", "on", "off"))
    hierarchy: str = _f("flat", "two-level exchange: node (the ranks of a node sum their gradients over shared memory, "
                                "then each compresses its share of the matrices and exchanges it with the same "
                                "share's ranks on the other nodes: one rank's bytes cross the network per node), "
                                "flat (every rank exchanges everything; the default: of the jobs bench hierarchy "
                                "measured, only the quantizers' gained), auto (node when there are several nodes with several "
                                "ranks each)", choices=("auto", "flat", "node"))
    start_compress_step: int = _f(10, "dense steps before compression starts (with --average-every > 1: dense rounds)", minimum=0)
    # parameter averaging (local steps)
    average_every: int = _f(1, "1: average gradients every step; H > 1: every rank takes H optimizer steps on its "
                               "own shard (its optimizer state stays its own), then the ranks average what the "
                               "parameters moved, through --compressor (with its error feedback), and take the "
                               "outer step", minimum=1)
    outer_optimizer: str = _f("average", "with --average-every > 1: average (the new parameters are the mean of the "
                                         "ranks') or nesterov (DiLoCo: the mean delta is the gradient of an SGD "
                                         "step with Nesterov momentum, --outer-lr, --outer-momentum)",
                              choices=("average", "nesterov"))
    # 1.0 / 0.5, not DiLoCo's 0.7 / 0.9: ahead on every one of three seeds of the 600-step LM (by
    # 0.17-0.23 bpc at H = 8) and of the default job (docs/averaging.md)
    outer_lr: float = _f(1.0, "nesterov outer step: learning rate", minimum=0.0)
    outer_momentum: float = _f(0.5, "nesterov outer step: momentum", minimum=0.0)
    # low-rank compressors (greedylore, powersgd)
    rank: int = _f(4, "low-rank rank r (powersgd, greedylore-paper); greedylore sends per matrix as many "
                      "directions as fit in the bytes powersgd sends at rank r", minimum=1)
    min_compression_rate: float = _f(2.0, "compress a matrix only if it saves this factor (greedylore: "
                                          "min(n,m) > rate*r; powersgd: (n+m)*r*rate < n*m)", minimum=0.0)
    uncompressed: str = _f("", "regular expression: parameters whose name matches are sent dense")
    refresh_every: int = _f(-1, "greedylore: dense step + SVD of the average every N compressed-phase steps "
                                "(0: only the first; -1: the compressor's default, 0 for greedylore, whose basis "
                                "tracks, and 200 for greedylore-paper)", minimum=-1)
    basis: str = _f("tracking", "greedylore basis between refreshes: tracking (rotated toward a warm-started "
                                "power step every step) or fixed (the paper's semi-lazy basis)",
                    choices=("tracking", "fixed"))
    allocation: str = _f("per-matrix", "greedylore directions: per-matrix (as many as fit in the bytes powersgd sends "
                                       "for that matrix at --rank) or global (one greedy choice over all matrices by "
                                       "energy per byte, within the same total)", choices=("global", "per-matrix"))
    factor_bits: int = _f(16, "greedylore: Q travels as 16-bit integers on shared per-row scales (exact integer "
                              "sums; error feedback keeps the rounding) or as 32-bit floats", choices=(16, 32))
    sketch_bits: int = _f(16, "greedylore: the first round (the tracking sketch, or the probes' projections) as 16-bit "
                              "integers on shared per-column scales with the uncompressed tensors as fixed-point "
                              "pairs, its bytes saved buying directions within the same --rank budget; or as 32-bit "
                              "floats, whose round can start in backward (--bucket-mb)", choices=(16, 32))
    refresh_residual: str = _f("keep", "greedylore: what a dense refresh does with the error-feedback residual: "
                                       "flush it into the refresh, keep it for the next step, or drop it",
                               choices=("flush", "keep", "drop"))
    select: str = _f("greedy", "greedylore directions: greedy (top-r by global energy), random (r of the "
                               "full basis), lazy (top-r singular vectors of the last refresh, GaLore-like)",
                     choices=("greedy", "random", "lazy"))
    scores: str = _f("probe", "greedylore energy estimates: probe (shared Gaussian probes) or exact "
                              "(Allreduce the full projections; diagnostics)", choices=("probe", "exact"))
    probes: int = _f(4, "greedylore: shared Gaussian probes per matrix", minimum=1)
    contraction_every: int = _f(0, "measure ||x - C(x)||^2/||x||^2 of the global average every N steps "
                                   "(one extra dense Allreduce; 0: off)", minimum=0)
    kernels: str = _f("auto", "low-rank compressors' products, bases, Gram-Schmidt and 16-bit rounds: compiled "
                              "(loops in a fixed order, the CPU's fastest) or torch (torch operations: the path a GPU "
                              "runs; on the CPU it checks the compiled one); auto: compiled on the CPU, torch on a GPU",
                      choices=("auto", "compiled", "torch"))
    warm_start: bool = _f(True, "powersgd: start each power iteration from the last Q")
    orthogonalization_epsilon: float = _f(1e-8, "powersgd: Gram-Schmidt guard for all-zero columns", minimum=0.0)
    # outputs
    run_dir: str = _f("", "output folder ('': runs/<UTC timestamp>)")
    log_every: int = _f(10, "write a train metrics line every N steps", minimum=1)
    eval_every: int = _f(100, "evaluate every N steps (0: only at the end)", minimum=0)
    progress: str = _f("auto", "progress bar on rank 0: auto (when stdout is a terminal), always, never",
                       choices=("auto", "always", "never"))
    tensorboard: bool = _f(False, "also write the metrics as TensorBoard events into RUN_DIR/tensorboard "
                                  "(pip install 'mpitrain[tensorboard]')")
    # quantizers and sparsifiers (payloads that cannot be summed)
    quantizer_exchange: str = _f("auto", "quantizers: gather (every rank decodes every other rank's payload: (N-1)*d "
                                         "values) or sharded (each rank decodes and re-encodes the sum of its 1/N share, "
                                         "the sums are gathered: under 2d values whatever N); auto: sharded from 4 ranks "
                                         "on",
                                 choices=("auto", "sharded", "gather"))
    nu: float = _f(0.1, "sparse-dither: error level nu (det: ||C(x)-x||^2 <= nu||x||^2; rand: variance omega = nu)",
                   minimum=1e-12)
    dither: str = _f("det", "sparse-dither rounding: det (nearest, biased, contractive) or rand (stochastic, "
                            "unbiased)", choices=("det", "rand"))
    alpha: float = _f(0.2, "spherical: error level alpha in (0, 1)", minimum=1e-6)
    block: int = _f(8, "spherical: block size m; encoding costs ~alpha^(-m/2) candidate draws per block, so it is "
                       "practical only for small blocks (m <= 16) and small models", minimum=1)
    levels: int = _f(16, "qsgd: quantisation levels s", minimum=1)
    ratio: float = _f(0.01, "topk / randk: fraction of each tensor's coordinates sent", minimum=1e-9)
    # checkpoints and resume
    checkpoint_every: int = _f(0, "write RUN_DIR/checkpoints/ckpt-STEP.h5 every N steps (0: only at the end)",
                               minimum=0)
    keep_last: int = _f(3, "keep the newest K checkpoints (0: keep all)", minimum=0)
    resume: str = _f("auto", "auto (follow RUN_DIR/checkpoints/latest, falling back to the newest that "
                             "verifies), none, or a checkpoint path")
    ef_resume: str = _f("auto", "error-feedback residuals in checkpoints: mean (one array, any world size; "
                                "linear compressors), gather (every rank's, same world size), reset (dropped); "
                                "auto: mean where possible, else gather",
                        choices=("auto", "mean", "gather", "reset"))
    nan_policy: str = _f("skip", "non-finite gradients on any rank: skip the step (counted) or abort",
                         choices=("skip", "abort"))
    # keeping a cluster job honest
    stall_timeout: float = _f(300.0, "end the job (exit 3, naming the ranks that did not arrive) when a rank waits in "
                                     "a collective longer than this many seconds (0: wait forever)", minimum=0.0)
    sync_check_every: int = _f(200, "every N steps compare a checksum of every rank's parameters and optimizer "
                                    "state (0: never)", minimum=0)
    on_divergence: str = _f("abort", "when a rank's checksum differs from rank 0's: abort (exit 1, naming the ranks) "
                                     "or rebroadcast (rank 0's state wins, counted in metrics)",
                            choices=("abort", "rebroadcast"))
    device: str = _f("auto", "where each rank computes: cpu, cuda (its GPU: local rank % GPUs on the node; "
                             "ranks may share one), or auto (cuda where CUDA is available, else cpu)",
                     choices=("auto", "cpu", "cuda"))
    threads: int = _f(0, "torch threads per rank (0: the node's cores divided by its ranks, or OMP_NUM_THREADS)",
                      minimum=0)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name: str, value, source: str):
    """Check (and for strings from env/CLI, parse) one value against its field."""
    f = FIELDS[name]
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
    where = f"{name} (from {source})"
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                value = text.lower() in ("1", "true", "yes", "on")
            else:
                value = kind(text)
        except ValueError:
            raise UsageError(f"{where}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UsageError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    meta = f.metadata
    if meta["choices"] and value not in meta["choices"]:
        raise UsageError(f"{where}: must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise UsageError(f"{where}: must be >= {meta['minimum']}; got {value!r}")
    if kind is float and not math.isfinite(value):
        raise UsageError(f"{where}: must be a finite number; got {value!r}")
    return value


def _key(raw: str) -> str:
    return raw.replace("-", "_").lower()


def from_file(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:  # a folder, no permission, an I/O error
        raise UsageError(f"cannot read config file {path}: {e.strerror or e}") from None
    out = {}
    for raw, value in data.items():
        key = _key(raw)
        if key not in FIELDS:
            raise UsageError(f"unknown config key {raw!r} in {path}")
        out[key] = _coerce(key, value, path)
    return out


def from_env(environ) -> dict:
    out = {}
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX) or var in NOT_SETTINGS:
            continue
        key = _key(var[len(ENV_PREFIX):])
        if key not in FIELDS:
            raise UsageError(f"unknown environment variable {var}")
        out[key] = _coerce(key, value, var)
    return out


# what `--help` shows: the knobs most runs turn; `--help-all` lists every flag
MAIN_FLAGS = ("model", "dataset", "steps", "batch_size", "accumulate", "optimizer", "lr", "grad_clip", "compressor",
              "rank", "run_dir", "checkpoint_every", "resume")


def add_arguments(parser: argparse.ArgumentParser, compressors: list[str], everything: bool = True):
    """Every setting as a flag; with `everything` False, --help describes only MAIN_FLAGS."""
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings (CLI > env > file > defaults)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration and exit" if everything else argparse.SUPPRESS)
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        help = f.metadata["help"].replace("%", "%%") + f" (default: {f.default!r})"
        if name == "compressor":
            help += "; one of: " + ", ".join(compressors)
        if not everything and name not in MAIN_FLAGS:
            help = argparse.SUPPRESS
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=help)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help)


def checked(**values) -> Config:
    """A Config from keyword arguments (the public API's options), each checked like a flag."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(unknown)}; see python -m mpitrain --help for the list")
    return _finish(Config(**{k: _coerce(k, v, "argument") for k, v in values.items()}))


def default_run_dir(now: float) -> str:
    """runs/<UTC time to the millisecond>, from a time every rank agrees on (`World.started`): the
    tasks of a job array, started in the same second from one folder, each get their own."""
    when = datetime.fromtimestamp(now, timezone.utc)
    return os.path.join("runs", when.strftime("%Y%m%dT%H%M%S") + f".{when.microsecond // 1000:03d}Z")


def resolve(args: argparse.Namespace, environ=None, compressors=(), now: float | None = None) -> Config:
    """Defaults < --config file < MPITRAIN_* env < CLI flags, every value checked."""
    values = {}
    if args.config:
        values.update(from_file(args.config))
    values.update(from_env(os.environ if environ is None else environ))
    for name in FIELDS:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = _coerce(name, given, "--" + name.replace("_", "-"))
    cfg = Config(**values)
    if compressors and cfg.compressor not in compressors:
        raise UsageError(f"unknown compressor {cfg.compressor!r}; choose one of {', '.join(compressors)}")
    return _finish(cfg, now)


def _finish(cfg: Config, now: float | None = None) -> Config:
    """Checks that span fields, and the default run dir."""
    if not re.fullmatch(r"[\w.-]+(:[\w.]+)?", cfg.model):
        raise UsageError(f"model {cfg.model!r} is neither a zoo name nor package.module:function")
    if cfg.uncompressed:
        try:
            re.compile(cfg.uncompressed)
        except re.error as e:
            raise UsageError(f"uncompressed: not a regular expression ({e}): {cfg.uncompressed!r}") from None
    if not 0 < cfg.alpha < 1:
        raise UsageError(f"alpha: must be in (0, 1); got {cfg.alpha}")
    if cfg.ratio > 1:
        raise UsageError(f"ratio: must be in (0, 1]; got {cfg.ratio}")
    if cfg.compressor == "auto" and cfg.average_every > 1:
        cfg.compressor = "dense"  # auto chooses how gradients travel; parameter averaging's stays the user's to name
    if not cfg.run_dir:
        cfg.run_dir = default_run_dir(time.time() if now is None else now)
    return cfg


# the settings that shape a compressor's saved state; and for a checkpoint written before a setting
# existed, the value it had then
STATE_SHAPING = ("rank", "sketch_bits", "factor_bits", "probes", "allocation", "min_compression_rate", "uncompressed")
BEFORE_IT_EXISTED = {"sketch_bits": 32}


def with_settings(fault: str, saved_json, cfg: Config) -> str:
    """A checkpoint's fault, and when it is its compressor state's: '; it was written with --x A
    (this run: B): ...' for the state-shaping settings in which its saved configuration differs."""
    try:
        saved = {**BEFORE_IT_EXISTED, **json.loads(saved_json)}
    except (ValueError, TypeError):
        return fault
    changed = [f"--{k.replace('_', '-')} {saved[k]} (this run: {getattr(cfg, k)})"
               for k in STATE_SHAPING if k in saved and saved[k] != getattr(cfg, k)]
    if not changed or not fault.startswith("/compressor"):
        return fault
    return f"{fault}; it was written with {', '.join(changed)}: resume with those settings"
