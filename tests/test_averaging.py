"""Parameter averaging (--average-every H) under a real mpiexec: the round's arithmetic, exact
resume between averages, a stop signal mid-round, non-finite deltas, every compressor."""
import json

import h5py
import numpy as np
import pytest

from helpers import WORKERS, mpi, trainer
from mpitrain import checkpoint, compress
from mpitrain.averaging import SKETCH
from test_checkpoint import COMMON, run_and_dump, runs_and_dumps

LOCAL = ["--compressor", "greedylore", "--optimizer", "adam", "--lr", 0.003, "--start-compress-step", 2,
         "--average-every", 8, "--outer-optimizer", "nesterov"]


def lines(folder, kind):
    return [x for x in map(json.loads, open(folder / "metrics.jsonl")) if x["kind"] == kind]


def test_average_every_1_is_todays_trajectory(tmp_path):
    flags = ["--steps", 15, "--compressor", "greedylore", "--optimizer", "adam", "--lr", 0.003,
             "--start-compress-step", 2]
    (today, same), _ = runs_and_dumps(2, (tmp_path / "today", *flags),
                                      (tmp_path / "h1", *flags, "--average-every", 1, "--outer-optimizer", "nesterov",
                                       "--outer-lr", 0.3))
    assert np.array_equal(today, same)
    assert [x["wire_bytes"] for x in lines(tmp_path / "today", "train")] == \
        [x["wire_bytes"] for x in lines(tmp_path / "h1", "train")]
    assert not lines(tmp_path / "h1", "round")


@pytest.mark.parametrize("outer", ["average", "nesterov"])
def test_a_round_is_the_outer_step_on_the_mean_of_the_ranks_deltas(tmp_path, outer):
    r = mpi(3, [WORKERS / "average_rounds.py", tmp_path / "out.json", outer])
    assert r.returncode == 0, r.stderr
    worst = json.loads((tmp_path / "out.json").read_text())
    assert worst["rounds"] == 3
    assert worst["local_step_bytes"] == [12] * 9  # between averages only the three control words travel
    assert worst["loss"] < 1e-6  # the agreed loss is the mean of the ranks' losses
    assert worst["ranks_differ"] == 0.0  # every rank ends each round with the same parameters, bit for bit
    assert worst["params"] < 1e-6  # the anchor minus the mean delta (or DiLoCo's step on it), float32 rounding
    assert worst["delta_norm"] < 1e-5 and worst["sent_delta_norm"] < 1e-5
    assert min(worst["disagreement_exact"]) > 0.1  # the ranks pull apart (each toward its own target)
    # a count sketch of SKETCH buckets: each rank's ||S v||^2 has std <= sqrt(2 / SKETCH) ||v||^2; 5 std
    assert worst["disagreement"] < 5 * (2 / SKETCH) ** 0.5


def test_a_stop_signal_between_averages_checkpoints_exits_75_and_resumes_exactly(tmp_path):
    flags = ["--steps", 20, "--model", "user_models:signals_on_rank1", *LOCAL]
    whole, _ = run_and_dump(tmp_path / "whole", 3, *flags)
    whole = [np.load(tmp_path / "whole" / f"params-{rank}.npy") for rank in range(3)]
    cut = tmp_path / "cut"
    r = trainer(3, "--run-dir", cut, *flags, *COMMON, SIGNAL_AT_CALL="11")
    assert r.returncode == 75, r.stderr
    assert "checkpoint" in r.stderr and "after step 11" in r.stderr
    ckpts = cut / "checkpoints"
    saved = ckpts / (ckpts / "latest").read_text().strip()
    assert saved.name == "ckpt-000000011.h5"
    with h5py.File(saved, "r") as f:  # between averages: every rank's own parameters and optimizer state
        assert f["averaging/local_params"].shape[0] == 3 and f["averaging/inner_state"].shape[0] == 3
    for refused, why in ((trainer(3, "--resume", saved, "--run-dir", tmp_path / "x", *flags, "--average-every", 1, *COMMON),
                          "resume with --average-every > 1"),
                         (trainer(2, "--resume", saved, "--run-dir", tmp_path / "y", *flags, *COMMON),
                          "resume on 3 ranks")):
        assert refused.returncode == 2 and why in refused.stderr and "Traceback" not in refused.stderr
    run_and_dump(cut, 3, *flags)
    for rank in range(3):
        assert np.array_equal(np.load(cut / f"params-{rank}.npy"), whole[rank])
    assert np.array_equal(whole[0], whole[2])  # the last step is always an average


def test_a_non_finite_delta_sends_every_rank_back_to_the_anchor(tmp_path):
    r = trainer(2, "--model", "user_models:poisons_on_rank1_step3", "--average-every", 4, "--steps", 8,
                "--run-dir", tmp_path, *COMMON)
    assert r.returncode == 0, r.stderr
    # the weight turns NaN after step 3's forward: step 4's gradient is skipped on every rank, and
    # the average after it finds rank 1's delta non-finite; from the anchor, steps 5-8 train on
    assert [x["skipped_steps"] for x in lines(tmp_path, "train")] == [0, 0, 0, 1, 1, 1, 1, 1]
    rounds = lines(tmp_path, "round")
    assert [(x["step"], x["skipped_rounds"]) for x in rounds] == [(4, 1), (8, 1)]
    assert "sent_delta_norm" not in rounds[0] and rounds[1]["sent_delta_norm"] > 0
    assert not checkpoint.verify(tmp_path / "checkpoints" / "ckpt-000000008.h5")  # nothing non-finite written


def test_every_compressor_runs_with_parameter_averaging(tmp_path):
    r = mpi(2, [WORKERS / "every_compressor_averaging.py", tmp_path], timeout=300)
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results) == compress.names()  # auto among them: with averaging it is dense
    for name, result in results.items():
        summary = result["summary"]
        assert result["rounds"] == [3, 6, 8], name  # every 3 steps, and at the last
        assert summary["skipped_rounds"] == 0 and summary["skipped_steps"] == 0, name
        assert 0 < summary["wire_bytes_per_rank"] < summary["dense_bytes_per_rank"], name
        assert not checkpoint.verify(tmp_path / name / "checkpoints" / "ckpt-000000008.h5"), name
    dense = lines(tmp_path / "dense", "round")
    # a dense round: the 2 KiB report, then every delta share and the control words in one Allreduce
    assert {x["wire_bytes"] for x in dense} == {8 * (SKETCH + 3) + dense[0]["dense_bytes"] + 12}
