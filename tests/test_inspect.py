"""`mpitrain inspect`: summaries, tree, verify, diff, export, and clear refusals; no MPI."""
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from helpers import run, trainer
from test_checkpoint import COMMON, corrupt


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    r = trainer(2, "--run-dir", d, "--steps", 6, "--checkpoint-every", 3, "--compressor", "greedylore",
                "--start-compress-step", 1, *COMMON)
    assert r.returncode == 0, r.stderr
    return d / "checkpoints" / "ckpt-000000003.h5", d / "checkpoints" / "ckpt-000000006.h5"


def inspect(*args, **extra_env):
    return run([sys.executable, "-m", "mpitrain", "inspect", *map(str, args)], **extra_env)


def test_summary_without_mpi(ckpts, tmp_path):
    # a fake mpi4py that cannot be imported proves inspect never touches MPI
    (tmp_path / "mpi4py").mkdir()
    (tmp_path / "mpi4py" / "__init__.py").write_text("raise ImportError('inspect must not import MPI')\n")
    r = inspect(ckpts[1], "--json", PYTHONPATH=f"{tmp_path}:{run.__globals__['ROOT']}")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["step"], info["world_size"], info["compressor"], info["ef_resume"]) == (6, 2, "greedylore", "gather")
    assert info["model_values"] == 85002 and info["config"]["steps"] == 6
    assert {"torch", "numpy", "h5py", "mpi"} <= info["versions"].keys()


def test_reading_never_imports_torch(ckpts, tmp_path):
    """Summary, tree, verify and diff read through the schema alone (startup: no torch import);
    a fake torch that cannot be imported proves it, for the checker child process too."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('reading must not import torch')\n")
    env = {"PYTHONPATH": f"{tmp_path}:{run.__globals__['ROOT']}"}
    for args in ([], ["--tree"], ["--verify"], ["--diff", ckpts[0]]):
        r = inspect(ckpts[1], *args, "--json", **env)
        assert r.returncode == 0, (args, r.stderr)


def test_a_closed_pipe_is_not_called_damage(ckpts):
    """`mpitrain inspect ... | head` whose reader has gone: no 'damaged checkpoint', no traceback."""
    r, w = os.pipe()
    os.close(r)
    try:
        done = subprocess.run([sys.executable, "-m", "mpitrain", "inspect", str(ckpts[1]), "--tree"], stdout=w,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=run.__globals__["ROOT"])
    finally:
        os.close(w)
    assert done.returncode == 1 and done.stderr == "", done.stderr


def test_bfloat16_reads_back_exactly(tmp_path):
    """bf16 is stored as its 16 bits: the schema's reader widens it to float32 exactly, the trainer's
    restores the bf16 tensor bit for bit."""
    from mpitrain import checkpoint, filewrite, schema
    vector = torch.tensor([1.0, -2.5, 3.140625, 1e-30, float("inf"), 65280.0]).to(torch.bfloat16)
    for values in (vector, vector[2].clone()):  # a 0-d value too
        with h5py.File(tmp_path / "x.h5", "w") as f:
            filewrite.write_dataset(f, "w", values)
        with h5py.File(tmp_path / "x.h5", "r") as f:
            wide, back = schema.read(f["w"]), checkpoint.read(f["w"])
        assert wide.dtype == np.float32 and wide.shape == values.shape
        assert np.array_equal(wide, values.float().numpy())
        assert back.dtype == torch.bfloat16 and back.shape == values.shape
        assert torch.equal(back.view(torch.int16), values.view(torch.int16))


def test_tree_lists_every_dataset_checksummed_and_state_by_parameter_name(ckpts):
    r = inspect(ckpts[0], "--tree", "--json")
    rows = json.loads(r.stdout)
    shapes = {x["name"]: x["shape"] for x in rows}
    assert {"/config", "/model/1.weight", "/optimizer/param_groups", "/optimizer/state/1.weight/momentum_buffer",
            "/compressor/shared/refreshed_at", "/rng/torch_cpu"} <= set(shapes)
    assert all(x["fletcher32"] for x in rows)
    # each compressed matrix (the MLP's 256x64, 256x256 and 10x256 weights) has its basis (d x d) and
    # its residual (the weight's shape, a row per rank of 2) under its own name; nothing is stored flat
    for name, (n, m) in {"1.weight": (256, 64), "3.weight": (256, 256), "5.weight": (10, 256)}.items():
        assert shapes[f"/compressor/shared/bases/{name}"] == [min(n, m)] * 2
        assert shapes[f"/compressor/residual/per_rank/{name}"] == [2, n, m]
        assert f"/compressor/shared/warm/{name}" in shapes and f"/compressor/shared/ranks/{name}" in shapes
    assert "/compressor/shared/bases" not in shapes and "/compressor/residual/per_rank" not in shapes


def test_verify_passes_then_names_the_corrupted_dataset(ckpts, tmp_path):
    assert inspect(ckpts[1], "--verify").returncode == 0
    bad = tmp_path / "bad.h5"
    shutil.copy(ckpts[1], bad)
    name = corrupt(bad)
    r = inspect(bad, "--verify")
    assert r.returncode == 1 and f"/model/{name}" in r.stdout


def test_verify_finds_nan(ckpts, tmp_path):
    bad = tmp_path / "nan.h5"
    shutil.copy(ckpts[1], bad)
    with h5py.File(bad, "r+") as f:
        ds = f["model/1.bias"]
        values = ds[()]
        values[3] = np.nan
        ds[...] = values
    r = inspect(bad, "--verify")
    assert r.returncode == 1 and "/model/1.bias: holds NaN or Inf" in r.stdout


def test_diff_and_export(ckpts, tmp_path):
    rows = json.loads(inspect(ckpts[0], "--diff", ckpts[1], "--json").stdout)
    assert {r["tensor"] for r in rows} == {"1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"}
    assert all(r["max_abs"] > 0 for r in rows)
    same = json.loads(inspect(ckpts[1], "--diff", ckpts[1], "--json").stdout)
    assert all(r["max_abs"] == 0 for r in same)
    out = tmp_path / "w.pt"
    assert inspect(ckpts[1], "--export-pt", out).returncode == 0
    state = torch.load(out, weights_only=True)
    with h5py.File(ckpts[1]) as f:
        assert np.array_equal(state["5.weight"].numpy(), f["model/5.weight"][()])


def test_a_run_dir_or_its_checkpoints_folder_is_read_through_latest(ckpts, tmp_path):
    newest = json.loads(inspect(ckpts[1], "--json").stdout)
    for where in (ckpts[1].parent.parent, ckpts[1].parent, ckpts[1].parent / "latest"):
        r = inspect(where, "--json")
        assert r.returncode == 0 and json.loads(r.stdout) == newest, r.stderr
    rows = json.loads(inspect(ckpts[0], "--diff", ckpts[1].parent.parent, "--json").stdout)
    assert rows == json.loads(inspect(ckpts[0], "--diff", ckpts[1], "--json").stdout)
    (tmp_path / "checkpoints").mkdir()
    for latest, says in ((None, "is a folder without checkpoints/latest"), ("../../etc/passwd", "does not name a checkpoint")):
        if latest:
            (tmp_path / "checkpoints" / "latest").write_text(latest)
        r = inspect(tmp_path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr


@pytest.mark.parametrize("kind", ["random", "truncated", "other_hdf5", "missing"])
def test_what_is_not_a_checkpoint_gets_one_line_and_exit_2(ckpts, tmp_path, kind):
    path = tmp_path / "x.h5"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "truncated":
        path.write_bytes(ckpts[1].read_bytes()[:20000])
    elif kind == "other_hdf5":
        with h5py.File(path, "w") as f:
            f["x"] = np.arange(3)
    for extra in ([], ["--verify"], ["--tree"]):
        r = inspect(path, *extra)
        assert r.returncode == 2, (kind, extra, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mpitrain inspect: error:") and "Traceback" not in r.stderr


@pytest.mark.skipif(not shutil.which("h5dump"), reason="hdf5-tools not installed (.ci/run installs them)")
def test_standard_hdf5_tools_read_checkpoints(ckpts):
    ls = subprocess.run(["h5ls", "-r", str(ckpts[1])], capture_output=True, text=True)
    assert ls.returncode == 0 and "/model/1.weight" in ls.stdout and "/compressor/shared/bases" in ls.stdout
    dump = subprocess.run(["h5dump", "-p", "-H", str(ckpts[1])], capture_output=True, text=True)
    assert dump.returncode == 0 and "FLETCHER32" in dump.stdout.upper()
    config = subprocess.run(["h5dump", "-d", "/config", str(ckpts[1])], capture_output=True, text=True)
    assert '"compressor": "greedylore"' in config.stdout.replace('\\"', '"')
