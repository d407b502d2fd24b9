"""The emulated cluster: real namespaces, real shaped links, real mpiexec across them; what it leaves
behind (nothing), and what a job does when a link fails or slows."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, WORKERS, env, mpi
from mpitrain import emulate
from mpitrain.comm import STALLED
from mpitrain.emulate import Cluster, parse_rate
from test_checkpoint import COMMON

CAN_EMULATE = os.geteuid() == 0 and shutil.which("ip") and shutil.which("tc")
needs_root = pytest.mark.skipif(not CAN_EMULATE, reason="emulate needs root with ip and tc (iproute2)")
RATE = parse_rate("200mbit")


def ours() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    return {n for n in listed if emulate.OURS.match(n)}


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def launcher(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mpitrain", "emulate", *map(str, args)], env=env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def ranks(cluster: Cluster, *argv, **kw) -> subprocess.Popen:
    return cluster.popen([str(a) for a in argv], env=cluster.env(env()), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, **kw)


def test_not_root_is_one_line_and_exit_2():
    """A real unprivileged process (forked from this one, its modules already loaded) asks for a cluster."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, run the command's main, report through the pipe
        try:
            sys.stderr = open(write, "w")  # pytest's capture stands in for the real one
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            code = emulate.main(["--nodes", "2", "--link", "1gbit", "--", "--steps", "1"])
            sys.stderr.flush()
        finally:
            os._exit(code if "code" in locals() else 99)
    os.close(write)
    with os.fdopen(read) as fh:
        err = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 2, err
    assert err.count("\n") == 1 and err.startswith("mpitrain: error: emulate needs root"), err


def test_a_mistyped_link_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "-m", "mpitrain", "emulate", "--link", "fast", "--", "--steps", "1"],
                       env=env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--link 'fast'" in r.stderr, r.stderr


@needs_root
def test_greedylore_over_200mbit_links_ends_bit_for_bit_as_on_shared_memory(tmp_path):
    flags = [*COMMON, "--compressor", "greedylore", "--steps", 40, "--progress", "never"]
    (tmp_path / "shm").mkdir()
    (tmp_path / "net").mkdir()
    r = mpi(2, [WORKERS / "train_and_dump.py", tmp_path / "shm", "--run-dir", tmp_path / "shm", *flags])
    assert r.returncode == 0, r.stderr
    links = root_links()
    with Cluster(2, 1, RATE) as cluster:
        rates = cluster.measure()
        # tbf lets a burst through at once, and the probe counts from the first byte: within 20% either way
        assert all(0.8 * RATE <= r <= 1.2 * RATE for r in rates), rates
        job = ranks(cluster, WORKERS / "train_and_dump.py", tmp_path / "net", "--run-dir", tmp_path / "net", *flags)
        out, err = job.communicate(timeout=180)
        assert job.returncode == 0, err
        assert root_links() == links  # both ends of every link live inside the cluster's namespaces
        assert len(ours()) >= 3
    assert "2 ranks x 32 samples per rank" in out and "on 2 nodes (mpitrain-" in out, out  # the start-up line names the emulated nodes
    for rank in range(2):
        assert np.array_equal(np.load(tmp_path / "shm" / f"params-{rank}.npy"),
                              np.load(tmp_path / "net" / f"params-{rank}.npy"))
    assert not ours()


@needs_root
def test_the_ranks_of_a_node_share_memory_with_each_other_and_with_no_other_node(tmp_path):
    # as on a real node: a node's ranks meet in shared memory, other nodes' only over the shaped links
    with Cluster(2, 2, RATE) as cluster:
        before = cluster.sent_bytes()
        job = ranks(cluster, WORKERS / "shared_memory.py", tmp_path)
        out, err = job.communicate(timeout=120)
        after = cluster.sent_bytes()
    assert job.returncode == 0, err
    assert all(b > a for a, b in zip(before, after)), (before, after)  # the nodes met over their links
    got = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(4)]
    assert [g["shares_memory_with"] for g in got] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert got[0]["node"] == got[1]["node"] != got[2]["node"] == got[3]["node"]


@needs_root
def test_nothing_is_left_after_an_exit_a_sigterm_and_a_sigkill_then_the_next_start(tmp_path):
    emulate.clean_stale()  # what an earlier, killed run left
    before = ours()
    links = root_links()
    quick = launcher("--nodes", 2, "--link", "1gbit", "--", "--steps", 2, "--run-dir", tmp_path / "a", *COMMON)
    out, err = quick.communicate(timeout=120)
    assert quick.returncode == 0, err
    assert "achieved n0" in out and ours() == before and root_links() == links
    for sig, wait in ((signal.SIGTERM, 0), (signal.SIGTERM, 3), (signal.SIGKILL, 3)):  # measuring, then running
        long = launcher("--nodes", 2, "--link", "1gbit", "--", "--steps", 100000, "--run-dir",
                        tmp_path / f"{sig.name}-{wait}", *COMMON)
        deadline = time.monotonic() + 60
        while len(ours() - before) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        made = ours() - before
        assert len(made) == 3, made  # two nodes and the switch
        time.sleep(wait)
        long.send_signal(sig)
        long.communicate(timeout=60)
        if sig == signal.SIGKILL:
            assert ours() - before == made  # the launcher had no chance: the next start cleans up
            script = tmp_path / "nothing.py"
            script.write_text("print('ran')\n")
            nxt = launcher("--nodes", 1, "--link", "1gbit", "--", script)
            out, err = nxt.communicate(timeout=60)
            assert nxt.returncode == 0 and "ran" in out, err
        assert ours() == before, (sig, ours())
        assert root_links() == links


@needs_root
def test_a_cut_link_ends_the_job_with_exit_3_naming_its_ranks_and_the_checkpoint_resumes(tmp_path):
    stall = 5
    with Cluster(3, 1, RATE) as cluster:
        job = ranks(cluster, "-m", "mpitrain", *COMMON, "--steps", 100000, "--checkpoint-every", 20,
                    "--stall-timeout", stall, "--run-dir", tmp_path, "--progress", "never")
        _wait_for_checkpoint(tmp_path, job)
        cut = time.monotonic()
        cluster.set_link(2, None)
        out, err = job.communicate(timeout=stall + 60)
        took = time.monotonic() - cut
    assert job.returncode == STALLED, err
    lines = [x for x in err.splitlines() if x.startswith("mpitrain: stalled")]
    assert lines and "rank(s) 2 did not arrive" in lines[0], err
    assert took <= stall + 10, took
    r = mpi(2, ["-m", "mpitrain", *COMMON, "--steps", 60, "--run-dir", tmp_path, "--ef-resume", "reset"])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr


@needs_root
def test_a_link_slowed_tenfold_mid_run_slows_the_job_without_a_false_stall(tmp_path):
    with Cluster(2, 1, parse_rate("1gbit")) as cluster:
        job = ranks(cluster, "-m", "mpitrain", *COMMON, "--steps", 400, "--checkpoint-every", 20,
                    "--stall-timeout", 5, "--run-dir", tmp_path, "--progress", "never", "--log-every", 1)
        _wait_for_checkpoint(tmp_path, job)
        cluster.set_link(1, parse_rate("100mbit"))
        changed = time.monotonic()
        out, err = job.communicate(timeout=300)
    assert job.returncode == 0 and "stalled" not in err, err
    train = [json.loads(x) for x in open(tmp_path / "metrics.jsonl") if '"train"' in x]
    times = [x["step_time_s"] for x in train]
    assert np.median(times[-50:]) >= 3 * np.median(times[5:20]), (times[5:20], times[-50:])
    assert time.monotonic() - changed > 1


def _wait_for_checkpoint(run_dir, job, limit=120):
    deadline = time.monotonic() + limit
    while not (run_dir / "checkpoints" / "latest").exists():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1] if job.poll() is not None else ""
        time.sleep(0.1)


@needs_root
def test_bench_network_measures_time_to_target_beside_ddp_and_reuses_finished_runs(tmp_path):
    argv = [sys.executable, "-m", "mpitrain", "bench", "network", "--jobs", "wide-mlp", "--links", "200mbit",
            "--arms", "dense,greedylore,auto,ddp-powersgd", "--steps", "30", "--out", str(tmp_path)]
    r = subprocess.run(argv, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "network-n1.json").read_text())["tables"]["network"]
    assert [(x["link"], x["arm"]) for x in rows] == [(link, arm) for link in ("shm", "0.2gbit")
                                                     for arm in ("dense", "greedylore", "auto", "ddp-powersgd")]
    by = {(x["link"], x["arm"]): x for x in rows}
    assert 0.16 <= by["0.2gbit", "dense"]["achieved_gbps"] <= 0.24
    dense = by["0.2gbit", "dense"]
    # a 4.5 MB dense exchange over 200 Mbit/s links: the step waits on it most of the time, and the
    # alpha-beta prediction from the shared-memory step and the bytes is near what was measured
    assert dense["exchange_share"] > 0.8 and dense["step_over_shm"] > 3, dense
    assert abs(dense["prediction_error"]) < 0.5, dense
    assert dense["target"] == dense["final"] - 0.01 and dense["to_target_s"] is not None
    assert by["0.2gbit", "greedylore"]["median_step_ms"] < 0.5 * dense["median_step_ms"]
    assert by["0.2gbit", "auto"]["choice"] == "greedylore" and by["shm", "auto"]["choice"] == "dense"
    assert by["0.2gbit", "ddp-powersgd"]["final"] > 0.5
    assert (tmp_path / "network-n1.png").stat().st_size > 10000 and not ours()
    again = subprocess.run(argv, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("is used again") == 8, again.stderr
