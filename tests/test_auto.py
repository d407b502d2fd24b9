"""--compressor auto: the choice it makes on shared memory and on a slow emulated link, recorded in
metrics.jsonl, kept in checkpoints and through a resume."""
import json

import h5py
import numpy as np

from helpers import ROOT, WORKERS, env, mpi, trainer
from test_checkpoint import COMMON
from test_emulate import needs_root
from mpitrain.emulate import Cluster, parse_rate


def records(run_dir, kind):
    return [x for x in map(json.loads, open(run_dir / "metrics.jsonl")) if x["kind"] == kind]


def test_on_shared_memory_auto_chooses_dense_keeps_it_through_a_resume(tmp_path):
    flags = [*COMMON, "--compressor", "auto", "--run-dir", tmp_path]
    r = trainer(2, "--steps", 20, *flags)
    assert r.returncode == 0, r.stderr
    [choice] = records(tmp_path, "compressor_choice")
    assert choice["choice"] == "dense" and choice["step"] == 15, choice
    assert "--compressor auto chose dense at step 15" in r.stdout
    assert choice["greedylore_step_s"] >= 0.9 * choice["dense_step_s"]  # the rule it applied
    train = records(tmp_path, "train")
    dense_bytes = train[0]["dense_bytes"]
    # greedylore ran steps 10-15 (its refresh, then compressed); dense before and after; the step that chose
    # dense also sending greedylore's residuals
    assert all(x["wire_bytes"] < dense_bytes for x in train[10:14]), [x["wire_bytes"] for x in train]
    assert train[14]["wire_bytes"] > dense_bytes
    assert all(x["wire_bytes"] == train[0]["wire_bytes"] for x in train[15:])
    with h5py.File(tmp_path / "checkpoints" / "ckpt-000000020.h5", "r") as f:
        assert f["compressor/shared/auto"][-1] == 1  # dense
    r = trainer(2, "--steps", 25, *flags)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    assert len(records(tmp_path, "compressor_choice")) == 1  # no second trial
    assert all(x["wire_bytes"] == train[0]["wire_bytes"] for x in records(tmp_path, "train")[20:])


def test_resumed_before_the_choice_it_measures_again(tmp_path):
    flags = [*COMMON, "--compressor", "auto", "--run-dir", tmp_path, "--checkpoint-every", 12]
    assert trainer(2, "--steps", 12, *flags).returncode == 0
    assert not records(tmp_path, "compressor_choice")
    r = trainer(2, "--steps", 24, *flags)
    assert r.returncode == 0, r.stderr
    [choice] = records(tmp_path, "compressor_choice")
    assert choice["step"] > 15 and choice["choice"] == "dense", choice  # greedylore's cold steps again


@needs_root
def test_on_a_100mbit_link_the_communication_bound_job_chooses_greedylore_and_a_resume_keeps_it(tmp_path):
    flags = [*COMMON, "--model", "wide-mlp", "--compressor", "auto", "--run-dir", tmp_path, "--progress", "never"]
    with Cluster(2, 1, parse_rate("100mbit")) as cluster:
        job = cluster.popen(["-m", "mpitrain", *map(str, flags), "--steps", "20"], env=cluster.env(env()), cwd=ROOT,
                            stdout=-1, stderr=-1, text=True)
        out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    [choice] = records(tmp_path, "compressor_choice")
    assert choice["choice"] == "greedylore" and choice["greedylore_step_s"] < 0.5 * choice["dense_step_s"], choice
    assert 0.05 <= choice["achieved_gbps"] <= 0.12, choice  # a 100 Mbit/s link, as the job measured it
    # on shared memory dense would win; the resumed run keeps what the measured network chose
    (tmp_path / "dump").mkdir()
    r = mpi(2, [WORKERS / "train_and_dump.py", tmp_path / "dump", *flags, "--steps", 26])
    assert r.returncode == 0, r.stderr
    train = records(tmp_path, "train")
    assert len(records(tmp_path, "compressor_choice")) == 1
    assert all(x["wire_bytes"] < x["dense_bytes"] / 10 for x in train[20:]), [x["wire_bytes"] for x in train]
    assert np.array_equal(np.load(tmp_path / "dump" / "params-0.npy"), np.load(tmp_path / "dump" / "params-1.npy"))
