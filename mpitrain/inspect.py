"""Reading checkpoints for people: `python -m mpitrain inspect PATH` or `mpitrain-inspect PATH`.

Never imports MPI, and torch only to export: reading goes through `schema`, so a look at a file
starts in a fraction of a second. Exit codes: 0 fine, 1 --verify found a fault, 2 not a checkpoint /
bad usage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from . import schema
from .config import UsageError


def checkpoint_at(path: str) -> str:
    """PATH itself, or the checkpoint `latest` names when PATH is a run dir, its checkpoints folder or
    that `latest` file (it is read as untrusted: one plain file name beside it)."""
    for latest in (os.path.join(path, "checkpoints", "latest"), os.path.join(path, "latest"), path):
        if os.path.basename(latest) == "latest" and os.path.isfile(latest):
            with open(latest, "rb") as fh:
                name = fh.read(256).decode("utf-8", "replace").strip()
            if not name or os.path.basename(name) != name or name in (".", ".."):
                raise UsageError(f"{latest} does not name a checkpoint beside it")
            return os.path.join(os.path.dirname(latest), name)
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder without checkpoints/latest: give a checkpoint file or a run dir")
    return path


def summary(path) -> dict:
    with schema.open_checkpoint(path) as f:
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        config = json.loads(schema.read(f["config"]))
        params = sum(int(np.prod(ds.shape)) for _, ds in schema.datasets(f["model"]))
        return {"path": str(path), "step": attrs["step"], "epoch": attrs.get("epoch"),
                "world_size": attrs["world_size"], "compressor": attrs["compressor"],
                "ef_resume": attrs["ef_resume"], "created": attrs.get("created"),
                "model_values": params, "versions": json.loads(attrs["versions"]), "config": config}


def tree(path) -> list[dict]:
    with schema.open_checkpoint(path) as f:
        return [{"name": "/" + name, "shape": list(ds.shape), "dtype": ds.attrs.get("dtype", str(ds.dtype)),
                 "fletcher32": bool(ds.fletcher32)} for name, ds in schema.datasets(f)]


def diff(path, other) -> list[dict]:
    """Per-tensor max abs and max relative difference of the model weights."""
    rows = []
    with schema.open_checkpoint(path, full=True) as a, schema.open_checkpoint(other, full=True) as b:
        names = sorted(set(a["model"]) | set(b["model"]))
        for name in names:
            if name not in a["model"] or name not in b["model"]:
                rows.append({"tensor": name, "only_in": str(path if name in a["model"] else other)})
                continue
            x = np.asarray(schema.read(a["model"][name]), dtype=np.float64)
            y = np.asarray(schema.read(b["model"][name]), dtype=np.float64)
            if x.shape != y.shape:
                rows.append({"tensor": name, "shapes": [list(x.shape), list(y.shape)]})
                continue
            d = np.abs(x - y)
            rows.append({"tensor": name, "max_abs": float(d.max(initial=0.0)),
                         "max_rel": float((d / np.maximum(np.abs(y), 1e-12)).max(initial=0.0))})
    return rows


def export_pt(path, out):
    """The model weights as a torch state_dict .pt file, the one format issue 4 asks for by name.

    This is the only place mpitrain writes torch's serialisation format, which encodes the dict
    structure itself; readers should load it with torch's weights_only loader, which accepts only
    tensors and plain containers. Checkpoints and every other file of the project are HDF5 or JSON.
    """
    import torch

    from . import checkpoint
    with schema.open_checkpoint(path, full=True) as f:
        state = {name: torch.as_tensor(checkpoint.read(ds)) for name, ds in f["model"].items()}
    torch.save(state, out)
    return len(state)


def _print(obj, as_json: bool):
    if as_json:
        print(json.dumps(obj, indent=2))
    elif isinstance(obj, list):
        for row in obj:
            print("  ".join(f"{k}={v}" for k, v in row.items()))
    else:
        for k, v in obj.items():
            print(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpitrain inspect", description="Look inside an mpitrain checkpoint "
                                     "(no MPI needed). Without options: a summary.")
    parser.add_argument("path", help="a checkpoint, or a run dir (its checkpoints/latest)")
    parser.add_argument("--tree", action="store_true", help="every dataset with shape, dtype, checksum flag")
    parser.add_argument("--verify", action="store_true", help="read every dataset, check checksums, scan for "
                        "NaN/Inf; exit 1 on any fault")
    parser.add_argument("--diff", metavar="OTHER", help="per-tensor differences of the model weights")
    parser.add_argument("--export-pt", metavar="OUT", help="write the model weights as a torch state_dict")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.error = lambda message: (_ for _ in ()).throw(UsageError(message))
    try:
        args = parser.parse_args(argv)
        args.path = checkpoint_at(args.path)
        args.diff = args.diff and checkpoint_at(args.diff)
        if args.verify:
            faults = schema.check_isolated(args.path, full=True)
            if faults and any(x in faults[0] for x in schema.NOT_A_CHECKPOINT):
                raise UsageError(faults[0])
            _print({"path": args.path, "ok": not faults, "faults": faults}, args.json)
            return 1 if faults else 0
        if args.tree:
            _print(tree(args.path), args.json)
        elif args.diff:
            _print(diff(args.path, args.diff), args.json)
        elif args.export_pt:
            count = export_pt(args.path, args.export_pt)
            _print({"exported": args.export_pt, "tensors": count}, args.json)
        else:
            _print(summary(args.path), args.json)
        return 0
    except UsageError as e:
        print(f"mpitrain inspect: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): not the file's fault, and nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail too
        return 1
    except schema.DAMAGE as e:  # a damaged file whose layout checked but whose data does not read
        print(f"mpitrain inspect: error: {args.path}: damaged checkpoint ({type(e).__name__}: {e})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
