"""Write mutated copies of a good checkpoint and put each through inspect and resume.

    python fuzz_checkpoints.py GOOD.h5 OUT_DIR SEED SHARD/SHARDS [trainer flags of the run that wrote GOOD...]

Of the mutations, those whose number is SHARD modulo SHARDS (so shards can run side by side).
One JSON line per file in OUT_DIR/results-SHARD.jsonl: the mutation, inspect's exit codes and output,
whether resume refused it or loaded it, and the traceback of anything that escaped (there should
be none). A line `{"start": NAME}` precedes each file, so a hang names its file.
"""
import contextlib
import io
import json
import shutil
import sys
import traceback
from pathlib import Path

import h5py
import numpy as np

from mpitrain import compress, inspect, schema, train
from mpitrain.config import Parser
from mpitrain.comm import World
from mpitrain.config import UsageError, add_arguments, resolve

good, out, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
shard, shards = map(int, sys.argv[4].split("/"))
schema.DEADLINE_S = 1.0  # a healthy 1.4 MB file checks in 0.12 s here; damaged headers can loop forever
rng = np.random.default_rng(seed)
PARAM = "/model/1.weight"
STATE = "/optimizer/state/1.weight"  # its optimizer state, by name (format 3)
BASIS, RESIDUAL = "/compressor/shared/bases/1.weight", "/compressor/residual/per_rank/1.weight"


def replace(f, where, **create):
    attrs = dict(f[where].attrs)
    del f[where]
    ds = f.create_dataset(where, **create)
    ds.attrs.update(attrs)
    return ds


def relink(f, where, link):
    del f[where]
    f[where] = link


# Edits a hostile or confused user might make: each must be reported by inspect --verify (exit 1)
# and refused by resume.
STRUCTURAL = {
    "external_link_added": lambda f: f["model"].__setitem__("extra", h5py.ExternalLink("other.h5", "/x")),
    "external_link_param": lambda f: relink(f, PARAM, h5py.ExternalLink(str(good), PARAM)),
    "soft_link_param": lambda f: relink(f, PARAM, h5py.SoftLink("/rng/torch_cpu")),
    "soft_link_group": lambda f: relink(f, "/compressor/shared", h5py.SoftLink("/model")),
    "string_dtype_param": lambda f: replace(f, PARAM, data=np.full(f[PARAM].shape, b"ten", dtype="S3")),
    "wrong_shape_param": lambda f: replace(f, PARAM, data=np.zeros((3, 5), np.float32)),
    "wrong_shape_declared_too": lambda f: replace(f, PARAM, data=np.zeros((3, 5), np.float32)).attrs.__setitem__(
        "shape", np.array([3, 5])),
    "wrong_dtype_param": lambda f: replace(f, PARAM, data=np.zeros(f[PARAM].shape, np.float64)),
    "wrong_dtype_declared_too": lambda f: replace(f, PARAM, data=np.zeros(f[PARAM].shape, np.float64)).attrs.__setitem__(
        "dtype", "float64"),
    "dtype_attribute_missing": lambda f: f[PARAM].attrs.__delitem__("dtype"),
    "huge_param": lambda f: replace(f, PARAM, shape=(2**40,), dtype=np.float32, chunks=(2**16,)),
    "huge_param_declared_too": lambda f: replace(f, PARAM, shape=(2**20, 2**20), dtype=np.float32,
                                                 chunks=(64, 64)).attrs.__setitem__("shape", np.array([2**20, 2**20])),
    "huge_rng": lambda f: replace(f, "/rng/torch_cpu", shape=(2**21, 2**21), dtype=np.uint8, chunks=(64, 64)),
    "external_storage_param": lambda f: replace(f, PARAM, shape=f[PARAM].shape, dtype=np.float32,
                                                external=[(str(out / "elsewhere.bin"), 0, h5py.h5f.UNLIMITED)]),
    "step_is_text": lambda f: f.attrs.__setitem__("step", "ten"),
    "step_is_float": lambda f: f.attrs.__setitem__("step", 3.5),
    "step_missing": lambda f: f.attrs.__delitem__("step"),
    "world_size_zero": lambda f: f.attrs.__setitem__("world_size", 0),
    "world_size_is_text": lambda f: f.attrs.__setitem__("world_size", "1"),
    "format_version_future": lambda f: f.attrs.__setitem__("format_version", 99),
    "format_version_text": lambda f: f.attrs.__setitem__("format_version", "2"),
    "ef_resume_unknown": lambda f: f.attrs.__setitem__("ef_resume", "banana"),
    "versions_not_json": lambda f: f.attrs.__setitem__("versions", "{torch: 2"),
    "config_not_json": lambda f: replace(f, "/config", data=np.array([b"{not json"])),
    "config_not_object": lambda f: replace(f, "/config", data=np.array([b"[1, 2]"])),
    "param_groups_not_list": lambda f: replace(f, "/optimizer/param_groups", data=np.array([b'{"params": 1}'])),
    "param_names_not_json": lambda f: f["optimizer"].attrs.__setitem__("param_names", "[net.1.weight"),
    "optimizer_state_wrong_shape": lambda f: replace(f, f"{STATE}/momentum_buffer",
                                                     data=np.zeros((7,), np.float32)).attrs.__setitem__(
        "shape", np.array([7])),
    "optimizer_state_unknown_param": lambda f: f.copy(f[STATE], "optimizer/state/no.such.weight"),
    "optimizer_state_by_index": lambda f: f.move(STATE, "optimizer/state/0"),
    "basis_unknown_param": lambda f: f.copy(f[BASIS], "compressor/shared/bases/no.such.weight"),
    "residual_rows_not_ranks": lambda f: replace(f, RESIDUAL, data=np.zeros((3, *f[RESIDUAL].shape[1:]), np.float32)
                                                 ).attrs.__setitem__("shape", np.array([3, *f[RESIDUAL].shape[1:]])),
    "residual_wrong_shape": lambda f: replace(f, RESIDUAL, data=np.zeros((f[RESIDUAL].shape[0], 4, 4), np.float32)
                                              ).attrs.__setitem__("shape", np.array([f[RESIDUAL].shape[0], 4, 4])),
    "model_group_is_dataset": lambda f: (f.__delitem__("model"), f.create_dataset("model", data=np.zeros(3))),
    "rng_missing": lambda f: f.__delitem__("rng"),
    "rng_wrong_rows": lambda f: replace(f, "/rng/torch_cpu", data=np.zeros((5, 8), np.uint8)),
    "unknown_dataset": lambda f: f.create_dataset("notes", data=np.zeros(3)),
    "model_tensor_missing": lambda f: f.__delitem__(PARAM),
}


def structural(name, path):
    shutil.copy(good, path)
    with h5py.File(path, "r+") as f:
        STRUCTURAL[name](f)


def flip(path, lo, hi, count):
    data = bytearray(good.read_bytes())
    for pos in rng.integers(lo, min(hi, len(data)), size=count):
        data[pos] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(data))


def truncate(path):
    data = good.read_bytes()
    path.write_bytes(data[:int(rng.integers(0, len(data)))])


def mutations():
    size = good.stat().st_size
    for name in STRUCTURAL:
        yield name, "structural", lambda p, name=name: structural(name, p)
    for i in range(120):  # object headers, superblock and B-trees sit mostly in the first few kB
        yield f"header_flip_{i}", "flip", lambda p, i=i: flip(p, 0, 4096, 1 + i % 4)
    for i in range(120):
        yield f"flip_{i}", "flip", lambda p, i=i: flip(p, 0, size, 1 + i % 8)
    for i in range(60):
        yield f"truncate_{i}", "truncate", truncate


def inspect_rc(*args):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = inspect.main([str(a) for a in args])
    return rc, stdout.getvalue(), stderr.getvalue()


world = World()
parser = Parser()
add_arguments(parser, compress.names())
cfg = resolve(parser.parse_args(sys.argv[5:]), compressors=compress.names())
run = train.prepare(cfg, world)
with open(out / f"results-{shard}.jsonl", "w") as log:
    for number, (name, kind, make) in enumerate(mutations()):
        if number % shards != shard:
            continue
        log.write(json.dumps({"start": name}) + "\n")
        log.flush()
        path = out / f"{name}.h5"
        make(path)
        result = {"file": name, "kind": kind, "escaped": []}
        for what, args in (("verify", ["--verify", path]), ("summary", [path]), ("tree", ["--tree", path]),
                           ("diff", ["--diff", good, path])):
            try:
                result[what], _, result[what + "_stderr"] = inspect_rc(*args)
            except BaseException:
                result["escaped"].append(f"inspect {what}: " + traceback.format_exc())
        cfg.resume = str(path)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                train.resume(run, world)
            result["resume"] = "loaded"
        except UsageError as e:
            result["resume"], result["resume_error"] = "refused", str(e)
        except BaseException:
            result["escaped"].append("resume: " + traceback.format_exc())
        log.write(json.dumps(result) + "\n")
        log.flush()
        path.unlink()
