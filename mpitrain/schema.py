"""What a checkpoint file must look like, checked without trusting the file.

Every check here reads metadata only (attributes, links, dtypes, shapes) before anything is
allocated, except `data_faults`, which reads each dataset once its size is known to fit the file
(fletcher32 checksums, NaN/Inf). Imports h5py and numpy only, so that it can run alone:

    python -m mpitrain.schema [--full] PATH     (prints the faults as JSON)

which is how `check_isolated` runs it. A damaged object header can send the HDF5 library into a
loop that no Python signal can interrupt; in a child process with a deadline that costs a fault
line, not a hung job. The same bytes read by the same library behave the same way in the parent
afterwards, so what the child finished reading the parent may read.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import h5py
import numpy as np

from .config import UsageError

# 2: every array declares its shape; /optimizer names its parameters. 3: state by parameter name
# (/optimizer/state/NAME, and the compressor's per-parameter state as one dataset per parameter)
FORMAT, FORMAT_VERSION = "mpitrain-checkpoint", 3
SCALAR = "scalar"  # attribute marking a 0-d value stored as shape (1,) (scalars cannot be chunked)
DEADLINE_S = 60.0  # for the isolated check, plus 1 s per 20 MB when it reads the data
# What h5py and the HDF5 library raise on a damaged file (and json/int on a damaged value).
DAMAGE = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, OverflowError, AttributeError)
ROOT_ATTRS = {"format": str, "format_version": int, "step": int, "epoch": int, "world_size": int, "created": str,
              "versions": str, "compressor": str, "ef_resume": str, "wire_bytes_total": int}
EF_POLICIES = ("mean", "gather", "reset")
TEXT = ("/config", "/optimizer/param_groups", "/user_json")
AVERAGING = ("/averaging/momentum", "/averaging/local_params", "/averaging/inner_state")
NON_FINITE = "holds NaN or Inf"
NOT_A_CHECKPOINT = ("no such checkpoint", "is not a readable HDF5 file", "is an HDF5 file but not")


def why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no detail'}"


def _is(value, kind) -> bool:
    if kind is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    return isinstance(value, str)


def open_h5(path) -> h5py.File:
    """Open read-only; raises UsageError for a missing file, or one that is not HDF5 or not ours."""
    try:
        f = h5py.File(path, "r", locking=False)
    except FileNotFoundError:
        raise UsageError(f"no such checkpoint: {path}") from None
    except DAMAGE as e:
        raise UsageError(f"{path} is not a readable HDF5 file ({str(e).split('(')[0].strip()})") from None
    try:
        ours = f.attrs.get("format") == FORMAT
    except DAMAGE:
        ours = False
    if not ours:
        f.close()
        raise UsageError(f"{path} is an HDF5 file but not an mpitrain checkpoint")
    return f


def root_faults(f: h5py.File) -> list[str]:
    """Every root attribute present, of its type and in its range."""
    faults = []
    try:
        attrs = {k: f.attrs[k] for k in ROOT_ATTRS if k in f.attrs}
    except DAMAGE as e:
        return [f"root attributes unreadable ({why(e)})"]
    for key, kind in ROOT_ATTRS.items():
        if key not in attrs:
            faults.append(f"root attribute {key} is missing")
        elif not _is(attrs[key], kind):
            faults.append(f"root attribute {key} is {type(attrs[key]).__name__} {attrs[key]!r}, not {kind.__name__}")
        elif kind is int and attrs[key] < (1 if key in ("format_version", "world_size") else 0):
            faults.append(f"root attribute {key} = {attrs[key]} is out of range")
    version = attrs.get("format_version")
    if _is(version, int) and version > FORMAT_VERSION:
        faults.insert(0, f"format version {version}; this mpitrain reads up to {FORMAT_VERSION}")
    if _is(attrs.get("ef_resume"), str) and attrs["ef_resume"] not in EF_POLICIES:
        faults.append(f"root attribute ef_resume = {attrs['ef_resume']!r} is not one of {', '.join(EF_POLICIES)}")
    if _is(attrs.get("versions"), str) and not isinstance(_json(attrs["versions"]), dict):
        faults.append("root attribute versions is not a JSON object")
    return faults


def text(ds: h5py.Dataset) -> str:
    """A JSON text dataset's content (a fixed-length string of shape (1,))."""
    return ds[()][0].decode("utf-8")


def _json(text: str):
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return None


def _walk(group: h5py.Group, prefix: str, faults: list, found: dict):
    """Collect the datasets under `group` by hard links only; any other kind of link is a fault."""
    try:
        names = sorted(group.keys())
    except DAMAGE as e:
        faults.append(f"{prefix or '/'}: unreadable group ({why(e)})")
        return
    for name in names:
        where = f"{prefix}/{name}"
        try:
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                target = getattr(link, "filename", "") + ":" + getattr(link, "path", "?")
                faults.append(f"{where}: a link ({type(link).__name__} to {target.lstrip(':')}); "
                              "a checkpoint holds none")
                continue
            obj = group[name]
        except DAMAGE as e:
            faults.append(f"{where}: unreadable ({why(e)})")
            continue
        if isinstance(obj, h5py.Group):
            _walk(obj, where, faults, found)
        elif isinstance(obj, h5py.Dataset):
            found[where] = obj
        else:
            faults.append(f"{where}: neither a group nor a dataset")


def _dataset_faults(where: str, ds: h5py.Dataset, file_size: int, declared_shapes: bool) -> list[str]:
    """A dataset's storage, dtype and size against what it declares and what the file can hold."""
    try:
        if ds.is_virtual or ds.external or (ds.size and not (ds.chunks and ds.fletcher32)):
            return [f"{where}: its data lives in other files or is not checksummed; checkpoints are self-contained "
                    "and checksummed"]
        dtype, shape = ds.dtype, ds.shape
        if shape is None:
            return [f"{where}: holds no dataspace"]
        text = where in TEXT
        if text != (dtype.kind == "S") or dtype.kind not in "fiubS" or dtype.fields or dtype.subdtype:
            return [f"{where}: stores {dtype}, expected {'text' if text else 'numbers'}"]
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > file_size:
            return [f"{where}: declares {shape} x {dtype.itemsize} bytes = {nbytes}, more than the whole file "
                    f"({file_size} bytes)"]
        if text:
            return [] if shape == (1,) else [f"{where}: text of shape {shape}, expected (1,)"]
        name, scalar = ds.attrs.get("dtype"), ds.attrs.get(SCALAR, False)
        if not _is(name, str):
            return [f"{where}: its dtype attribute is missing or not text"]
        expected = np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name) if name in np.sctypeDict else None
        if expected is None or expected != dtype:
            return [f"{where}: stored as {dtype} but declared {name}"]
        if declared_shapes:
            declared = ds.attrs.get("shape")
            want = (1,) if scalar else tuple(int(n) for n in np.asarray(declared).reshape(-1)) \
                if declared is not None else None
            if declared is None or want != shape or (scalar and np.asarray(declared).size):
                return [f"{where}: shape {shape} differs from its declared shape "
                        f"{None if declared is None else list(np.asarray(declared).reshape(-1))}"]
    except DAMAGE as e:
        return [f"{where}: unreadable ({why(e)})"]
    return []


def structure_faults(f: h5py.File, file_size: int) -> tuple[list[str], dict]:
    """Faults of the file's layout against the schema, checked from metadata alone (nothing large is
    read), and the datasets by path. A file without faults here is safe to read."""
    faults = root_faults(f)
    if faults:
        return faults, {}
    version = int(f.attrs["format_version"])
    found: dict[str, h5py.Dataset] = {}
    _walk(f, "", faults, found)
    groups = {p.rsplit("/", 1)[0] for p in found}
    faults += [f"missing {key}" for key in ("/config", "/optimizer/param_groups", "/rng/torch_cpu") if key not in found]
    faults += [f"missing {key}" for key in ("/model",) if key not in groups]
    for where, ds in found.items():
        parts = where.split("/")[1:]
        residual = where.rsplit("/", 1)[0] if version >= 3 and len(parts) == 4 else where
        known = (where in TEXT or where == "/rng/torch_cpu" or (len(parts) == 2 and parts[0] == "model")
                 or (len(parts) == 4 and parts[:2] == ["optimizer", "state"] and (version >= 3 or parts[2].isdigit()))
                 or (len(parts) in ((3, 4) if version >= 3 else (3,)) and parts[:2] == ["compressor", "shared"])
                 or (len(parts) == 2 and parts[0] == "user")
                 or residual in ("/compressor/residual/mean", "/compressor/residual/per_rank") or where in AVERAGING)
        faults += _dataset_faults(where, ds, file_size, version >= 2) if known else \
            [f"{where}: not part of the checkpoint schema"]
    if faults:
        return faults, found
    world = int(f.attrs["world_size"])
    for where in ("/rng/torch_cpu", "/compressor/residual/per_rank") + AVERAGING[1:]:
        if where in found and (len(found[where].shape) != 2 or found[where].shape[0] != world):
            faults.append(f"{where}: shape {found[where].shape}, expected one row per rank of {world}")
    faults += _by_name_faults(found, world) if version >= 3 else []
    config, groups = _json(text(found["/config"])), _json(text(found["/optimizer/param_groups"]))
    if not isinstance(config, dict):
        faults.append("/config: not a JSON object")
    if "/user_json" in found and _json(text(found["/user_json"])) is None and text(found["/user_json"]) != "null":
        faults.append("/user_json: not JSON")
    if not (isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                             and all(_is(i, int) for i in g["params"]) for g in groups)):
        faults.append("/optimizer/param_groups: not a JSON list of groups with integer params")
    if version >= 2:
        faults += _optimizer_faults(f, found)
    return faults, found


def _by_name_faults(found: dict, world: int) -> list[str]:
    """Format 3's per-parameter pieces of compressor state belong to parameters of /model, and a
    residual has its parameter's shape (after one row per rank, when stored per rank)."""
    faults = []
    for where, ds in found.items():
        parts = where.split("/")
        if parts[1:2] != ["compressor"] or len(parts) != 5:
            continue
        param = found.get(f"/model/{parts[4]}")
        if param is None:
            faults.append(f"{where}: state of {parts[4]}, which /model does not hold")
            continue
        rows = {"mean": (), "per_rank": (world,)}.get(parts[3]) if parts[2] == "residual" else None
        want = None if rows is None else (*rows, *param.shape)
        if want is not None and ds.shape != want:
            faults.append(f"{where}: shape {ds.shape}, expected {want} (/model/{parts[4]}"
                          f"{', one row per rank' if parts[3] == 'per_rank' else ''})")
    return faults


def _optimizer_faults(f: h5py.File, found: dict) -> list[str]:
    """Optimizer state against the model it belongs to: per-parameter arrays have the parameter's shape."""
    try:
        names = _json(f["optimizer"].attrs.get("param_names", ""))
    except DAMAGE as e:
        return [f"/optimizer: unreadable attributes ({why(e)})"]
    if not (isinstance(names, list) and all(isinstance(n, str) and f"/model/{n}" in found for n in names)):
        return ["/optimizer: param_names is not a JSON list of the names in /model"]
    faults = []
    for where, ds in found.items():
        parts = where.split("/")
        if parts[1:3] == ["optimizer", "state"]:
            name = parts[3] if int(f.attrs["format_version"]) >= 3 else None
            if name is None and int(parts[3]) >= len(names):
                faults.append(f"{where}: state of parameter {parts[3]}, but the model has {len(names)}")
                continue
            if name is not None and name not in names:
                faults.append(f"{where}: state of {name}, which /optimizer's param_names does not list")
                continue
            name = name or names[int(parts[3])]
            param = found[f"/model/{name}"]
            if ds.shape != (1,) and (ds.shape, ds.dtype) != (param.shape, param.dtype):
                faults.append(f"{where}: {ds.dtype} {ds.shape} does not match /model/{name}, "
                              f"{param.dtype} {param.shape}")
    return faults


def data_faults(found: dict) -> list[str]:
    """Read every dataset of a checked file: checksum failures and non-finite floats."""
    faults = []
    for where, ds in found.items():
        try:
            value = ds[()]
        except DAMAGE as e:  # HDF5 reports a fletcher32 mismatch as a read error
            faults.append(f"{where}: unreadable ({str(e).split(';')[0]})")
            continue
        if ds.attrs.get("dtype") == "bfloat16":  # stored as uint16: all-ones exponent is NaN or Inf
            bad = ((value.view(np.uint16) & 0x7F80) == 0x7F80).any()
        else:
            bad = value.dtype.kind == "f" and not np.isfinite(value).all()
        if bad:
            faults.append(f"{where}: {NON_FINITE}")
    return faults


def printable(text: str) -> str:
    """Names from a damaged file may not be valid UTF-8; escape what is not."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check(path, full: bool = True) -> list[str]:
    """Faults of the file at `path`, in this process: layout, then (full) every dataset's data.
    A missing file or one that is not an mpitrain checkpoint is the single fault."""
    try:
        f = open_h5(path)
    except UsageError as e:
        return [printable(str(e))]
    with f:
        try:
            faults, found = structure_faults(f, os.path.getsize(path))
            if full and not faults:
                faults = data_faults(found)
        except DAMAGE as e:
            faults = [f"damaged ({why(e)})"]
    return [printable(x) for x in faults]


_CHECKED: dict = {}  # (file identity, full) -> faults; a file is checked once per process


def deadline_s(size: int, full: bool = True) -> float:
    """How long the isolated check of a file of `size` bytes may take."""
    return DEADLINE_S + (size / 20e6 if full else 0)


def isolated(module: str, path, deadline: float, *flags: str) -> list[str]:
    """The faults `python -m module [flags] path` prints as JSON, run in a child process that is
    killed past `deadline` seconds (a fault then, as is a crash of the child): for a file HDF5
    must read before the parent dares to."""
    cmd = [sys.executable, "-m", module, *flags, str(path)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=deadline, stdin=subprocess.DEVNULL)
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        last = (done.stderr.strip().splitlines() or ["no message"])[-1][:160]
        return json.loads(done.stdout) if done.returncode == 0 else [f"reading it ended the checker with {how} ({last})"]
    except subprocess.TimeoutExpired:
        return [f"reading it did not finish in {deadline:.0f} s (a damaged file can send HDF5 into a loop)"]
    except ValueError:
        return ["the checker's answer did not parse"]


def check_isolated(path, full: bool = True) -> list[str]:
    """`check` in a child process with a deadline (DEADLINE_S, plus 1 s per 20 MB when reading the data)."""
    try:
        st = os.stat(path)
    except OSError:
        return check(path, full)  # missing or unreadable: nothing for HDF5 to loop on
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if (key, True) in _CHECKED or (key, full) in _CHECKED:
        return _CHECKED.get((key, full), _CHECKED.get((key, True)))
    faults = isolated("mpitrain.schema", path, deadline_s(st.st_size, full), *(["--full"] if full else []))
    _CHECKED[(key, full)] = faults
    return faults


# -- reading a checked file --------------------------------------------------------------------
def open_checkpoint(path, isolated: bool = True, full: bool = False) -> h5py.File:
    """Open read-only once the layout checks (first in a child process with a deadline, unless a
    rank that already did so vouches for the file; `full`: every dataset's checksum too, for callers
    that read all the data); any fault raises UsageError. NaN or Inf in the data is not a fault here."""
    faults = [x for x in check_isolated(path, full) if not x.endswith(NON_FINITE)] if isolated else []
    if not faults:
        try:
            f = open_h5(path)
        except UsageError as e:
            faults = [str(e)]
    if not faults:
        try:
            faults, _ = structure_faults(f, os.path.getsize(path))
        except DAMAGE as e:
            faults = [f"damaged ({why(e)})"]
        if faults:
            f.close()
    if faults:
        first = faults[0] if any(x in faults[0] for x in NOT_A_CHECKPOINT) else f"{path}: {faults[0]}"
        raise UsageError(first + (f" (and {len(faults) - 1} more faults)" if len(faults) > 1 else ""))
    return f


def read(ds: h5py.Dataset):
    """A dataset's value: numpy array (bfloat16 widened to float32, exactly), or text."""
    value = ds[()]
    if ds.dtype.kind == "S":
        return value[0].decode("utf-8")
    if ds.attrs.get(SCALAR, False):
        value = value.reshape(())
    if ds.attrs.get("dtype") == "bfloat16":  # stored as its 16 bits: the high half of a float32
        return np.asarray(value.astype(np.uint32) << 16).view(np.float32)  # a 0-d shift gives a scalar
    return value


def datasets(f: h5py.File):
    """(path, dataset) for every dataset in a checked file, in a stable order."""
    found = []
    f.visititems(lambda name, obj: found.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
    return sorted(found)


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(check(args[-1], full="--full" in args)))
