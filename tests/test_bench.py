"""The benchmarks run and write their figures (speed itself is measured, never asserted)."""
import json

from helpers import mpi


def test_bench_allreduce_writes_its_table(tmp_path):
    r = mpi(2, ["-m", "mpitrain", "bench", "allreduce", "--repeats", 3, "--out", tmp_path])
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "allreduce-n2.json").read_text())["tables"]["allreduce"]
    assert [row["model"] for row in rows] == ["mlp", "cnn", "transformer"]
    assert all(row["speed_ratio"] > 0 and row["bytes"] > 0 for row in rows)
    assert "| mlp | 2 |" in (tmp_path / "allreduce-n2.md").read_text()


def test_bench_rejects_an_unknown_benchmark(tmp_path):
    r = mpi(1, ["-m", "mpitrain", "bench", "nosuch", "--out", tmp_path])
    assert r.returncode == 2 and r.stderr.count("mpitrain: error:") == 1
