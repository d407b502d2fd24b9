"""HDF5 checkpoints: schema, atomic write by rank 0, keep-last-K, `latest`, checked loading (which one
to resume from: `rundir.py`).

    /                  attrs: format, format_version, step, epoch, world_size, created, versions,
                              compressor, ef_resume, wire_bytes_total
    /config            the resolved configuration, JSON text
    /model/NAME        one dataset per state_dict entry (parameters and buffers)
    /optimizer/param_groups           JSON text
    /optimizer/state/NAME/KEY         per-parameter optimizer state (format 2: INDEX for NAME)
    /compressor/shared/KEY[/NAME]     state identical on every rank, stored once; per parameter
                                      when the compressor lays it out so (format 2: flat)
    /compressor/residual/mean/NAME    ef_resume=mean: the sum of the ranks' residual shares
    /compressor/residual/per_rank/NAME  ef_resume=gather: one row per rank first
    /averaging/momentum               --average-every > 1 (/model holds the parameters the ranks agreed
                                      on at the last average): the outer (nesterov) momentum,
    /averaging/inner_state            each rank's own optimizer state, one float32 row per rank,
    /averaging/local_params           and each rank's own parameters, one row per rank (only when the
                                      checkpoint falls between averages)
    /rng/torch_cpu     each rank's torch generator state, one row per rank
    /user/NAME, /user_json            a user loop's own arrays and JSON (save_checkpoint's extra)

Every dataset is chunked with fletcher32 checksums (JSON text as a fixed-length string, so
h5dump prints it); no lzf, no serialised Python objects: loading a checkpoint never runs code. Rank 0 writes a
temporary file in the same folder, fsyncs it, renames it into place and fsyncs the folder; only
then does `latest` (the file name of the newest complete checkpoint) move, the same way.

This module takes the MPI world as an argument and never imports it, so `inspect` can use the
readers without MPI.
"""
from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import torch

from .config import CannotWrite, Config, UsageError, one_line, with_settings
from .filewrite import WRITER, Sink, as_array, atomic_write, copy_into, on_disk_bytes, write_dataset
from .layout import all_finite
from .named_state import flat_optimizer_state, joined, optimizer_names, pieces, set_optimizer_state
from .schema import (DAMAGE, FORMAT, FORMAT_VERSION, ROOT_ATTRS, SCALAR, check_isolated, open_checkpoint,
                     why)
from .schema import read as schema_read


def folder(run_dir: str) -> Path:
    return Path(run_dir) / "checkpoints"


def file_name(step: int) -> str:
    return f"ckpt-{step:09d}.h5"


def step_of(path: Path) -> int | None:
    stem = Path(path).name
    if stem.startswith("ckpt-") and stem.endswith(".h5") and stem[5:-3].isdigit():
        return int(stem[5:-3])
    return None


@dataclass
class Contents:
    """What a checkpoint saves and restores: one run's parts (`api` builds them from an Exchange)."""
    cfg: Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    compressor: object  # compress.base.Compressor
    layout: object      # layout.GradLayout
    averaging: object = None  # averaging.ParameterAveraging, with --average-every > 1


# -- writing -----------------------------------------------------------------------------------

def versions(world) -> dict:
    return {"mpitrain": __import__("mpitrain").__version__, "torch": torch.__version__, "numpy": np.__version__,
            "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version, "python": platform.python_version(),
            "mpi": world.library_version()}


def ef_policy(cfg, compressor) -> str:
    if cfg.ef_resume == "auto":
        return "mean" if compressor.linear else "gather"
    return cfg.ef_resume


def intact(ckpt_dir: Path) -> str:
    """What is left to resume from, for a message about a checkpoint that was not written."""
    last = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None
    return f"the last checkpoint, {last}, is intact" if last else "no checkpoint was written before"


def require_space(ckpt_dir: Path, need: int, path: Path):
    """Refuse before HDF5 writes anything when the disk visibly lacks room (a quota it does not
    show is caught by `Sink`)."""
    free = shutil.disk_usage(ckpt_dir).free
    if free < need:
        raise CannotWrite(f"no space for checkpoint {path.name} in {ckpt_dir}: it needs about {need / 1e6:.1f} MB, "
                          f"{free / 1e6:.1f} MB are free; {intact(ckpt_dir)}")


def save(contents: Contents, world, step: int, epoch: int = 0, wire_bytes_total: int = 0, extra: dict | None = None,
         extra_json=None, background: bool = False) -> Path | None:
    """Every rank calls this: the ranks' own state is gathered to rank 0, rank 0 snapshots it all
    into host buffers and writes, in the background when asked (`WRITER.wait()` until it is on
    disk). Returns the path on rank 0. `extra` (arrays by name) and `extra_json` are the caller's
    own, stored under /user and /user_json."""
    cfg = contents.cfg
    bad = [k for k in (extra or {}) if not isinstance(k, str) or not k or "/" in k or k.startswith(".")]
    if bad:
        raise ValueError(f"extra array names must be non-empty text without '/': {bad[:3]}")
    refusal = (f"refusing to write a checkpoint at step {step}: the parameters hold NaN or Inf "
               "(the run diverged; the checkpoints before it are intact)")
    # rank 0 checks its snapshot in the writer, before writing it: off the training thread
    diverged = world.first_rank_where(world.rank != 0 and not all_finite(contents.layout.params))
    if diverged is not None:  # that rank says so and ends the job; the others wait for the end
        if diverged == world.rank:
            raise CannotWrite(refusal)
        world.barrier()
    if world.rank == 0:
        WRITER.wait()  # never two writes at once, and the snapshot buffers are free again
    policy = ef_policy(cfg, contents.compressor)
    ranks_own = gather(contents, world, policy)
    if world.rank != 0:
        return None
    tree, group_attrs, own_params = snapshot(contents, ranks_own, policy, extra or {}, extra_json)
    attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "epoch": int(epoch),
             "world_size": world.size, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "versions": json.dumps(versions(world)), "compressor": cfg.compressor, "ef_resume": policy,
             "wire_bytes_total": int(wire_bytes_total)}
    ckpt_dir = folder(cfg.run_dir)
    with one_line(OSError, CannotWrite, lambda e: f"cannot make the checkpoint folder {ckpt_dir}: {e.strerror or e}"):
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob("*.tmp-*"):  # left by a writer that was killed; never a complete file
        stale.unlink(missing_ok=True)
    path = ckpt_dir / file_name(step)

    def write_file(tmp):
        with Sink(tmp) as sink, h5py.File(sink, "w") as f:
            f.attrs.update(attrs)
            write_tree(f, tree)
            for group, values in group_attrs.items():
                f[group].attrs.update(values)
        if sink.failure is not None:
            raise sink.failure

    def write():
        if not all_finite(torch.from_numpy(own_params)):
            raise CannotWrite(refusal)
        with one_line(OSError, CannotWrite,
                      lambda e: f"cannot write checkpoint {path.name} in {ckpt_dir}: {e.strerror or e}; {intact(ckpt_dir)}"):
            atomic_write(path, write_file)
            atomic_write(ckpt_dir / "latest", lambda tmp: tmp.write_text(path.name + "\n"))
        prune(ckpt_dir, cfg.keep_last, keep=path)

    require_space(ckpt_dir, on_disk_bytes(tree), path)
    if background:
        WRITER.submit(write)
    else:
        write()
    return path


def gather(contents: Contents, world, policy: str) -> dict:
    """What each rank holds of its own, on rank 0 (in its snapshot buffers; None elsewhere): the
    residual by `policy` (the ranks' sum, or one row per rank), every generator state and, when
    averaging, every rank's optimizer state and parameters between averages. A collective."""
    def gathered(key: str, arr: np.ndarray) -> np.ndarray | None:
        arr = np.ascontiguousarray(arr)
        if world.rank != 0:
            return world.gather(arr)
        buf = WRITER.buffer(key, (world.size, *arr.shape), arr.dtype)
        copy_into(buf[0], arr)  # rank 0's own part on torch's threads: MPI's copy of it runs on one
        return world.gather(buf[0], out=buf)
    own = {}
    contents.compressor.collect_state()
    residual = contents.compressor.state_dict(copy=False).get("local", {}).get("residual")
    if residual is not None and policy == "mean":  # the sum of shares: the mean residual
        own["residual"] = world.allreduce_(WRITER.snapshot("residual", residual)[0] if world.rank == 0 else
                                           np.array(residual, dtype=np.float32))
    elif residual is not None and policy == "gather":
        own["residual"] = gathered("residual", np.asarray(residual, dtype=np.float32))
    own["rng"] = gathered("rng", torch.get_rng_state().numpy())
    averaging = contents.averaging
    if averaging is not None:  # each rank's own optimizer state, and its own parameters between averages
        own["inner_state"] = gathered("averaging/inner_state", flat_optimizer_state(contents.optimizer))
        if averaging.local_steps:
            own["local_params"] = gathered("averaging/local_params", as_array(contents.layout.params)[0])
    return own


def snapshot(contents: Contents, ranks_own: dict, policy: str, extra: dict,
             extra_json) -> tuple[dict, dict, np.ndarray]:
    """Rank 0's checkpoint as a tree of host arrays that training may no longer touch, and texts:
    (the tree as the file holds it, the attributes of its groups, the parameters to check before
    writing, rank 0's own)."""
    snap, opt, averaging = WRITER.snapshot, contents.optimizer.state_dict(), contents.averaging
    # the trained parameters in one copy (the agreed ones when averaging), the model's arrays views of it
    flat = snap("params", contents.layout.params if averaging is None else averaging.anchor)[0]
    trained = {slot.name: (flat[slot.offset: slot.offset + slot.numel].reshape(slot.shape), "float32")
               for slot in contents.layout.slots}
    local = ranks_own.get("local_params")
    names, by_name = optimizer_names(contents.optimizer, contents.model), contents.compressor.state_layout()
    state = {names[index]: {key: snap(f"state/{index}/{key}", v if isinstance(v, torch.Tensor) else np.asarray(v))
                            for key, v in entries.items()} for index, entries in opt["state"].items()}
    shared = {key: snap(f"shared/{key}", np.asarray(v))
              for key, v in contents.compressor.state_dict(copy=False).get("shared", {}).items()}
    compressor = {"shared": {key: pieces(v, by_name[key]) if key in by_name else v for key, v in shared.items()}}
    if "residual" in ranks_own:
        residual = ranks_own["residual"]
        compressor["residual"] = {"mean" if policy == "mean" else "per_rank":
                                  pieces(residual, by_name["residual"]) if "residual" in by_name else residual}
    model = {name: trained.get(name) or snap(f"model/{name}", t) for name, t in contents.model.state_dict().items()}
    tree = {"config": contents.cfg.to_json(), "model": model,
            "optimizer": {"param_groups": json.dumps(opt["param_groups"]), "state": state},
            "compressor": compressor, "rng": {"torch_cpu": ranks_own["rng"]}}
    if averaging is not None:
        tree["averaging"] = {"inner_state": (ranks_own["inner_state"], "float32"),
                             **({"momentum": snap("averaging/momentum", averaging.momentum)}
                                if averaging.momentum is not None else {}),
                             **({"local_params": (local, "float32")} if local is not None else {})}
    if extra:
        tree["user"] = {key: snap(f"user/{key}", v) for key, v in extra.items()}
    if extra_json is not None:
        tree["user_json"] = json.dumps(extra_json)
    group_attrs = {"optimizer": {"param_names": json.dumps(names)}, "compressor": {"name": contents.cfg.compressor}}
    return tree, group_attrs, local[0] if local is not None else flat  # rank 0's parameters, as they are


def write_tree(group: h5py.Group, values: dict):
    """Each value as a dataset of `group`, a dict of them as a group of its own."""
    for name, value in values.items():
        write_tree(group.create_group(name), value) if isinstance(value, dict) else write_dataset(group, name, value)


def prune(ckpt_dir: Path, keep_last: int, keep: Path):
    if keep_last <= 0:
        return
    found = sorted((p for p in ckpt_dir.glob("ckpt-*.h5") if step_of(p) is not None), key=step_of)
    for old in found[:-keep_last]:
        if old != keep:
            old.unlink(missing_ok=True)


def read(ds: h5py.Dataset):
    """A dataset's value (`schema.read`), bfloat16 restored as a torch tensor."""
    value = schema_read(ds)
    return torch.from_numpy(value).to(torch.bfloat16) if ds.attrs.get("dtype") == "bfloat16" else value


def verify(path, contents: Contents | None = None) -> list[str]:
    """Faults found by checking the layout, then reading every dataset (checksums) and scanning floats
    for NaN/Inf, in a child process with a deadline; with `contents`, also whether the checkpoint fits its
    model, optimizer and compressor."""
    faults = check_isolated(path, full=True)
    return faults if faults or contents is None else fit(path, contents)


def fit(path, contents: Contents) -> list[str]:
    """Whether a checked file fits this run (`fit_faults`)."""
    with open_checkpoint(path, isolated=False) as f:
        return fit_faults(f, contents)


def fit_faults(f: h5py.File, contents: Contents) -> list[str]:
    """Whether a checked file fits this run's compressor, model and optimizer (shapes and dtypes)."""
    if f.attrs["compressor"] != contents.cfg.compressor:
        return [f"it was written with --compressor {f.attrs['compressor']} (this run: {contents.cfg.compressor})"]
    faults = []
    model = contents.model.state_dict()
    stored = set(f["model"].keys())
    if stored != set(model):
        extra, lacking = sorted(stored - set(model)), sorted(set(model) - stored)
        return [f"does not fit this model ({contents.cfg.model}): "
                + "; ".join(x for x in (f"unknown tensors {', '.join(extra[:3])}" if extra else "",
                                        f"missing tensors {', '.join(lacking[:3])}" if lacking else "") if x)]
    for name, tensor in model.items():
        ds, want = f["model"][name], str(tensor.dtype).replace("torch.", "")
        shape = () if ds.attrs.get(SCALAR, False) else ds.shape
        if shape != tuple(tensor.shape) or ds.attrs["dtype"] != want:
            faults.append(f"/model/{name}: {ds.attrs['dtype']} {shape} does not fit this model's {want} "
                          f"{tuple(tensor.shape)}")
    params = [p for group in contents.optimizer.param_groups for p in group["params"]]
    groups = json.loads(read(f["optimizer/param_groups"]))
    mine = contents.optimizer.state_dict()["param_groups"]
    if [g["params"] for g in groups] != [g["params"] for g in mine]:
        faults.append("/optimizer/param_groups: the groups do not match this optimizer's parameters")
    named = int(f.attrs["format_version"]) >= 3  # optimizer state under parameter names, not indices
    index = {name: i for i, name in enumerate(optimizer_names(contents.optimizer, contents.model))}
    for key, entries in f["optimizer/state"].items():
        i = index.get(key) if named else int(key) if key.isdigit() and int(key) < len(params) else None
        if i is None:
            faults.append(f"/optimizer/state/{key}: no such parameter in this model")
            continue
        for name, ds in entries.items():
            if ds.shape not in ((1,), tuple(params[i].shape)) or ds.dtype.kind != "f":
                faults.append(f"/optimizer/state/{key}/{name}: {ds.dtype} {ds.shape} does not fit parameter "
                              f"{key} {tuple(params[i].shape)}")
    fresh, by_name = contents.compressor.state_dict(), contents.compressor.state_layout()
    stored = {f"compressor/shared/{k}": k for k in (f["compressor/shared"] if "compressor/shared" in f else [])}
    stored.update({f"compressor/residual/{k}": "residual" for k in ("mean", "per_rank")
                   if f"compressor/residual/{k}" in f})
    fresh = {**fresh.get("shared", {}), **fresh.get("local", {})}
    for where, key in stored.items():
        have, item = fresh.get(key), f[where]
        if isinstance(item, h5py.Group):
            want = dict(by_name.get(key, []))
            got = {name: ds.shape[1:] if where.endswith("per_rank") else
                   () if ds.attrs.get(SCALAR, False) else ds.shape for name, ds in item.items()}
            if got != want:
                faults.append(f"/{where}: its parameters and shapes do not fit this compressor's "
                              f"({len(got)} stored, {len(want)} expected)")
        elif have is not None and key == "residual" and item.shape[-1:] != np.shape(have)[-1:]:
            faults.append(f"/{where}: shape {item.shape} does not fit this compressor's {np.shape(have)}")
        elif have is not None and key != "residual" and np.shape(have) != (() if item.attrs.get(SCALAR, False)
                                                                           else item.shape):
            faults.append(f"/{where}: shape {item.shape} does not fit this compressor's {np.shape(have)}")
    numel, state_size = contents.layout.numel, sum(ds.size for g in f["optimizer/state"].values() for ds in g.values())
    for key, ds in f["averaging"].items() if "averaging" in f else []:
        want = {"momentum": (numel,), "local_params": (ds.shape[0], numel),
                "inner_state": (ds.shape[0], state_size)}.get(key)
        if ds.shape != want or ds.dtype != np.float32:
            faults.append(f"/averaging/{key}: {ds.dtype} {ds.shape} does not fit this model's {numel} parameters "
                          f"and {state_size} optimizer state values")
    rng = f["rng/torch_cpu"]
    if rng.dtype != np.uint8 or rng.shape[1] != torch.get_rng_state().numel():
        faults.append(f"/rng/torch_cpu: {rng.dtype} {rng.shape} is not a torch generator state per rank")
    return [with_settings(fault, read(f["config"]), contents.cfg) for fault in faults[:1]] + faults[1:]


def load_averaging(f: h5py.File, averaging, contents: Contents, rank: int):
    """The anchor (/model, already loaded) and outer momentum, this rank's parameters (when the
    checkpoint was taken between averages) and its own optimizer state. A checkpoint written with
    --average-every 1 has none of /averaging: every rank starts from its state."""
    group = f["averaging"] if "averaging" in f else {}
    averaging.reset_anchor()
    if averaging.momentum is not None and "momentum" in group:
        averaging.momentum.copy_(torch.from_numpy(read(group["momentum"])))
    elif averaging.momentum is not None:
        averaging.momentum.zero_()
    if "local_params" in group:
        contents.layout.params.copy_(torch.from_numpy(group["local_params"][rank]))
    averaging.local_steps = int("local_params" in group)  # only whether params differ from the anchor matters
    if "inner_state" in group and group["inner_state"].size:
        set_optimizer_state(contents.optimizer, group["inner_state"][rank])


def load(path: Path, contents: Contents, world) -> tuple[dict, dict, object]:
    """Restore model, optimizer, compressor and generator state on every rank; returns the root attrs,
    the caller's extra arrays and extra JSON. Every rank checks the layout and the fit before it
    reads an array."""
    cfg = contents.cfg
    with open_checkpoint(path, isolated=False) as f:  # rank 0 checked it in a child process (choose)
        faults = fit_faults(f, contents)
        if faults:
            raise UsageError(f"{path.name}: {faults[0]}")
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items() if k in ROOT_ATTRS}
        saved_world, per_rank = attrs["world_size"], "compressor/residual/per_rank" in f
        averaging, own = contents.averaging, [k for k in ("local_params", "inner_state")
                                                            if f"averaging/{k}" in f and f[f"averaging/{k}"].size]
        if own and averaging is None:
            raise UsageError(f"{path.name} holds each rank's own optimizer state (written with --average-every "
                             f"{json.loads(read(f['config'])).get('average_every', '> 1')}); resume with "
                             "--average-every > 1")
        if own and saved_world != world.size:
            raise UsageError(f"{path.name} holds each rank's own optimizer state for {saved_world} ranks "
                             f"(--average-every > 1); resume on {saved_world} ranks")
        if per_rank and saved_world != world.size and cfg.ef_resume not in ("reset", "mean"):
            raise UsageError(f"{path.name} holds per-rank residuals of {saved_world} ranks (ef_resume=gather); "
                             f"resume on {saved_world} ranks, or with --ef-resume reset (or mean, for a "
                             "compressor whose residuals re-shard)")
        try:
            contents.model.load_state_dict({name: torch.as_tensor(read(ds)) for name, ds in f["model"].items()})
            index = {name: i for i, name in enumerate(optimizer_names(contents.optimizer, contents.model))}
            opt_state = {int(i) if attrs["format_version"] < 3 else index[i]:
                         {k: torch.as_tensor(read(ds)) for k, ds in g.items()} for i, g in f["optimizer/state"].items()}
            groups = json.loads(read(f["optimizer/param_groups"]))
            contents.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
            by_name = contents.compressor.state_layout()

            def flat(where: str, key: str, row: int | None = None) -> np.ndarray:  # format 2 stored it flat
                item = f[where]
                if isinstance(item, h5py.Group):
                    return joined(item, by_name[key], read, where.endswith("per_rank"), row)
                return read(item) if row is None else item[row]
            comp = {"shared": {k: flat(f"compressor/shared/{k}", k) for k in f["compressor/shared"]}
                    if "compressor/shared" in f else {}, "local": {}}
            if per_rank and saved_world == world.size:
                comp["local"]["residual"] = flat("compressor/residual/per_rank", "residual", world.rank)
            elif per_rank and cfg.ef_resume == "mean":  # the ranks' sum, shared out again
                comp["local"]["residual"] = flat("compressor/residual/per_rank", "residual").sum(0) / world.size
            elif "compressor/residual/mean" in f:
                comp["local"]["residual"] = flat("compressor/residual/mean", "residual") / world.size
            contents.compressor.load_state_dict(comp)
            if averaging is not None:
                load_averaging(f, averaging, contents, world.rank)
            rng = read(f["rng/torch_cpu"])
            extra = {k: read(ds) for k, ds in f["user"].items()} if "user" in f else {}
            extra_json = json.loads(read(f["user_json"])) if "user_json" in f else None
        except DAMAGE as e:
            raise UsageError(f"{path.name} does not load ({why(e)})") from None
        if saved_world == world.size:
            torch.set_rng_state(torch.from_numpy(rng[world.rank].copy()))
        else:
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, attrs["step"], world.rank])
                                  .generate_state(1)[0]))
    return attrs, extra, extra_json
