"""The benchmarks run and write their figures (speed itself is measured, never asserted)."""
import json
import sys

import numpy as np
import pytest
from helpers import mpi, run
from mpitrain import checkpoint


def test_bench_allreduce_writes_its_table(tmp_path):
    r = mpi(2, ["-m", "mpitrain", "bench", "allreduce", "--repeats", 3, "--out", tmp_path])
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "allreduce-n2.json").read_text())["tables"]["allreduce"]
    assert [row["model"] for row in rows] == ["mlp", "cnn", "transformer"]
    assert all(row["speed_ratio"] > 0 and row["watched_speed_ratio"] > 0 and row["bytes"] > 0 for row in rows)
    assert "| mlp | 2 |" in (tmp_path / "allreduce-n2.md").read_text()


def test_bench_guard_writes_its_table(tmp_path):
    r = mpi(2, ["-m", "mpitrain", "bench", "guard", "--repeats", 1, "--out", tmp_path], timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "guard-n2.json").read_text())["tables"]["guard"]
    assert [(row["stall_timeout_s"], row["sync_check_every"]) for row in rows] == [(0, 0), (300, 0), (300, 200),
                                                                                 (300, 1)]
    assert rows[0]["overhead_vs_off"] == 0 and all(row["median_wall_s"] > 0 for row in rows)


def test_bench_checkpoint_trains_saves_in_line_and_behind_training_and_loads(tmp_path):
    r = mpi(1, ["-m", "mpitrain", "bench", "checkpoint", "--repeats", 1, "--out", tmp_path], timeout=300)
    assert r.returncode == 0, r.stderr
    [row] = json.loads((tmp_path / "checkpoint-n1.json").read_text())["tables"]["checkpoint"]
    # the file holds the weights, their momentum and the compressor's residual: at least three copies
    assert row["params"] > 24e6 and row["file_mb"] > 3 * row["model_mb"] > 3 * 97
    assert all(row[key] > 0 for key in ("save_s", "load_s", "step_s", "background_snapshot_s", "background_write_s"))
    [saved] = (tmp_path / "checkpoint-run" / "checkpoints").glob("ckpt-*.h5")  # --keep-last 1
    assert checkpoint.verify(saved) == []


def test_bench_rejects_an_unknown_benchmark(tmp_path):
    r = mpi(1, ["-m", "mpitrain", "bench", "nosuch", "--out", tmp_path])
    assert r.returncode == 2 and r.stderr.count("mpitrain: error:") == 1


def test_bench_convergence_rejects_an_unknown_job_or_arm_in_one_line(tmp_path):
    for flag, name in (("--jobs", "nosuch"), ("--arms", "dense,zip"), ("--seeds", "0,x1"), ("--seeds", "1,1")):
        r = mpi(2, ["-m", "mpitrain", "bench", "convergence", flag, name, "--out", tmp_path])
        assert r.returncode == 2 and r.stderr.count("mpitrain: error:") == 1, r.stderr
        assert "Traceback" not in r.stderr and name.split(",")[-1] in r.stderr


def test_bench_list_names_every_benchmark_and_each_writes_csv_and_png(tmp_path):
    r = mpi(1, ["-m", "mpitrain", "bench", "--list"])
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert names == ["allreduce", "compress", "convergence", "checkpoint", "bytes-to-target", "guard", "peer", "project",
                     "overlap", "network", "hierarchy", "gpu", "quantizers"]
    r = mpi(2, ["-m", "mpitrain", "bench", "allreduce", "--repeats", 2, "--out", tmp_path])
    assert r.returncode == 0, r.stderr
    rows = (tmp_path / "allreduce-n2.csv").read_text().splitlines()
    assert rows[0].startswith("model,ranks,bytes,") and len(rows) == 4
    from matplotlib import image
    assert image.imread(tmp_path / "allreduce-n2.png").shape[0] > 100


def test_bench_hierarchy_without_links_tables_the_compression_work_of_every_share(tmp_path):
    # the emulated clusters need root and minutes (test_emulate runs bench network's); no links: work only
    r = mpi(1, ["-m", "mpitrain", "bench", "hierarchy", "--links", "", "--out", tmp_path])
    assert r.returncode == 0, r.stderr
    tables = json.loads((tmp_path / "hierarchy-n1.json").read_text())["tables"]
    assert set(tables) == {"compute"}
    assert [(row["model"], row["compressor"]) for row in tables["compute"]] == [
        (m, c) for m in ("wide-mlp", "transformer") for c in ("powersgd", "greedylore")]
    assert all(row[f"slowest_of_{k}_ms"] > 0 for row in tables["compute"] for k in (2, 4))
    r = mpi(1, ["-m", "mpitrain", "bench", "hierarchy", "--layouts", "2y2", "--out", tmp_path])
    assert r.returncode == 2 and "--layouts takes NODESxRANKS" in r.stderr.strip().splitlines()[-1], r.stderr


def test_bench_peer_runs_torch_ddp_beside_ours_from_one_launch(tmp_path):
    r = run([sys.executable, "-m", "mpitrain", "bench", "peer", "--steps", "30", "--out", str(tmp_path)], timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "peer-n1.json").read_text())["tables"]["peer"]
    assert [(row["ranks"], row["arm"]) for row in rows] == [(n, arm) for n in (2, 4) for arm in (
        "ddp-dense", "ddp-powersgd", "dense", "powersgd", "greedylore")]
    assert all(row["median_step_ms"] > 0 and 0 < row["eval_accuracy"] <= 1 for row in rows)


def test_bench_quantizers_tables_both_exchanges_against_dense(tmp_path):
    n = 3
    r = mpi(n, ["-m", "mpitrain", "bench", "quantizers", "--steps", 15, "--repeats", 1, "--out", tmp_path])
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / f"quantizers-n{n}.json").read_text())["tables"]["quantizers"]
    assert [row["arm"] for row in rows] == ["dense", "sparse-dither-gather", "sparse-dither-sharded", "qsgd-gather",
                                            "qsgd-sharded"]
    d = rows[0]["numel"]
    for row in rows:
        assert row["wall_s"] > 0 and 0 < row["eval_accuracy"] <= 1 and row["sent_bytes"] > 0
        # what each exchange decodes a step: nothing (dense), every payload, or a share of each and every sum
        want = {"dense": 0, "gather": n - 1, "sharded": (n - 2) * (d // n) / d + 1}[row["arm"].rpartition("-")[2]]
        assert row["decoded_over_d"] == pytest.approx(want, abs=1e-12)  # rank 0's share: the first d // n
    assert rows[0]["wall_over_dense"] == 1


def test_bench_gpu_runs_every_arm_and_ddp_at_one_and_two_ranks_and_the_device_tests(tmp_path):
    """Here, without CUDA, its dry run: a small transformer on the CPU through the same code (our
    exchange on the torch path, staged where a device would stage), DDP on gloo."""
    r = run([sys.executable, "-m", "mpitrain", "bench", "gpu", "--steps", "1", "--out", str(tmp_path)], timeout=600)
    assert r.returncode == 0, r.stderr
    tables = json.loads((tmp_path / "gpu-n1.json").read_text())["tables"]
    rows = tables["gpu"]
    assert [(row["ranks"], row["arm"]) for row in rows] == [(n, arm) for n in (1, 2) for arm in (
        "dense", "powersgd-r4", "powersgd-r8", "greedylore-r4", "greedylore-r8", "ddp-dense", "ddp-powersgd-r4")]
    assert all(row["step_ms"] >= row["forward_backward_ms"] > 0 and row["step_over_ddp"] > 0 for row in rows)
    assert all(row["exchange_ms"] > 0 for row in rows if not row["arm"].startswith("ddp"))
    assert [row["backend"] for row in rows if row["arm"].startswith("ddp")] == ["gloo"] * 4
    assert tables["tests"][0]["exit"] == 0 and "passed" in tables["tests"][0]["result"]


def test_bench_convergence_averaging_arms_write_rounds_and_bytes_to_dense(tmp_path):
    r = mpi(2, ["-m", "mpitrain", "bench", "convergence", "--jobs", "digits-mlp", "--arms", "dense,dense-h4",
                "--steps", 40, "--out", tmp_path], timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "convergence-n2.json").read_text())["tables"]["convergence"]
    assert [(row["arm"], row["rounds"]) for row in rows] == [("dense", 40), ("dense-h4", 10)]
    assert rows[0]["mb_to_dense_final"] is not None and rows[1]["wire_mb_per_rank"] < rows[0]["wire_mb_per_rank"] / 3
    from matplotlib import image
    assert image.imread(tmp_path / "convergence.png").shape[0] > 100


def test_bench_convergence_over_seeds_tables_each_run_and_the_spread_per_arm(tmp_path):
    r = mpi(2, ["-m", "mpitrain", "bench", "convergence", "--jobs", "digits-mlp", "--arms", "dense,powersgd",
                "--steps", 30, "--seeds", "3,5", "--out", tmp_path], timeout=300)
    assert r.returncode == 0, r.stderr
    tables = json.loads((tmp_path / "convergence-n2.json").read_text())["tables"]
    rows, spread = tables["convergence"], tables["across_seeds"]
    assert [(row["arm"], row["seed"]) for row in rows] == [("dense", 3), ("dense", 5), ("powersgd", 3), ("powersgd", 5)]
    assert len({row["run_dir"] for row in rows}) == 4
    accuracy = {(row["arm"], row["seed"]): row["eval_accuracy"] for row in rows}
    assert accuracy[("dense", 3)] != accuracy[("dense", 5)]  # another seed: another initialisation and order
    assert [(s["arm"], s["seeds"]) for s in spread] == [("dense", 2), ("powersgd", 2)]
    for s in spread:
        mine = [accuracy[(s["arm"], seed)] for seed in (3, 5)]
        gaps = [accuracy[(s["arm"], seed)] - accuracy[("dense", seed)] for seed in (3, 5)]
        assert s["mean"] == pytest.approx(np.mean(mine)) and s["sd"] == pytest.approx(np.std(mine, ddof=1))
        assert (s["min"], s["max"]) == (min(mine), max(mine))
        assert s["minus_dense_mean"] == pytest.approx(np.mean(gaps))
    assert spread[0]["minus_dense_mean"] == 0 and spread[0]["reached_dense_final"] == 2


def test_bench_overlap_measures_each_named_compressor(tmp_path):
    r = mpi(2, ["-m", "mpitrain", "bench", "overlap", "--repeats", 1, "--compressors", "dense,powersgd,greedylore",
                "--out", tmp_path], timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "overlap-n2.json").read_text())["tables"]["overlap"]
    assert [row["compressor"] for row in rows] == ["dense", "powersgd", "greedylore"]
    for row in rows:
        assert row["buckets"] > 1 and 0 < row["backward_s"] and 0 < row["overlapped_step_s"]
    r = mpi(1, ["-m", "mpitrain", "bench", "overlap", "--compressors", "randk", "--out", tmp_path])
    assert r.returncode == 2 and "unknown compressor randk" in r.stderr
    for flags, words in ((["--repeats", 0], "--repeats must be >= 1; got 0"),
                         (["--out", tmp_path / "overlap-n2.json"], "overlap-n2.json is not a folder")):
        r = mpi(2, ["-m", "mpitrain", "bench", "overlap", *flags])
        assert r.returncode == 2 and r.stderr.count("mpitrain: error:") == 1 and words in r.stderr, r.stderr
