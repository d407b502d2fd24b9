"""A cluster job that never hangs and never trusts a file: stalls, divergence, hostile checkpoints,
world sizes, large messages. Every multi-rank case runs under a real mpiexec."""
import json
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from helpers import MPIEXEC, ROOT, WORKERS, env, mpi, one_launch_per_world_size, run, trainer
from mpitrain import compress
from mpitrain.comm import NODE_ENV, STALLED
from test_checkpoint import COMMON, run_and_dump


def test_a_stopped_rank_ends_the_job_with_exit_3_naming_it(tmp_path):
    timeout = 6
    started = time.monotonic()
    r = trainer(4, "--model", "user_models:stops_on_rank1_step3", "--stall-timeout", timeout, "--steps", 50,
                "--run-dir", tmp_path, "--checkpoint-every", 1, *COMMON, timeout=120)
    took = time.monotonic() - started
    assert r.returncode == STALLED, (r.returncode, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.startswith("mpitrain: stalled")]
    assert len(lines) == 1 and "step 3" in lines[0] and "rank(s) 1 did" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    # steps 1 and 2 were checkpointed; the stalled step 3 never is
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*")) == \
        ["ckpt-000000001.h5", "ckpt-000000002.h5"]
    assert took <= timeout + 10 + 8, took  # + 8: four ranks importing torch on two cores before step 1


def test_no_stall_message_when_nothing_is_wrong(tmp_path):
    r = trainer(3, "--stall-timeout", 5, "--steps", 30, "--run-dir", tmp_path, *COMMON)
    assert r.returncode == 0 and "stalled" not in r.stderr, r.stderr


def test_divergence_is_caught_within_one_check_interval_and_named(tmp_path):
    r = trainer(3, "--model", "user_models:drifts_on_rank1_step3", "--sync-check-every", 4, "--steps", 20,
                "--run-dir", tmp_path, "--checkpoint-every", 1, *COMMON)
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("sync check at step 4: rank(s) 1 hold") == 1 and "Traceback" not in r.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*"))[-1] == "ckpt-000000003.h5"


def test_rebroadcast_makes_every_rank_hold_rank_0s_state_again(tmp_path):
    run_and_dump(tmp_path, 3, "--model", "user_models:drifts_on_rank1_step3", "--sync-check-every", 4,
                 "--steps", 12, "--on-divergence", "rebroadcast")
    params = [np.load(tmp_path / f"params-{r}.npy") for r in range(3)]
    assert np.array_equal(params[0], params[1]) and np.array_equal(params[0], params[2])
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["rebroadcasts"] for x in lines if x["kind"] == "train"] == [0] * 3 + [1] * 9
    assert lines[-1]["rebroadcasts"] == 1
    # without the drift the checks pass and nothing is broadcast
    run_and_dump(tmp_path / "clean", 3, "--sync-check-every", 4, "--steps", 12, "--on-divergence", "rebroadcast")
    assert json.loads(open(tmp_path / "clean" / "metrics.jsonl").readlines()[-1])["rebroadcasts"] == 0


def test_the_default_job_runs_on_16_ranks_without_flags(tmp_path):
    r = trainer(16, "--run-dir", tmp_path, "--progress", "never", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "16 ranks x 32 samples per rank = global batch 512" in r.stdout
    assert "Warning" not in r.stderr and "warn" not in r.stderr.lower(), r.stderr[-2000:]
    summary = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["world_size"] == 16 and summary["eval_accuracy"] > 0.9


def test_the_batch_shrinks_to_fit_a_large_world_and_a_user_batch_is_still_checked(tmp_path):
    r = trainer(0, "--print-config", MPITRAIN_BATCH_SIZE="0")
    assert json.loads(r.stdout)["batch_size"] == 0  # resolved from the data at start-up, not here
    from mpitrain.data import batch_for
    assert batch_for(1438, 1, 0) == 32 and batch_for(1438, 64, 0) == 22 and batch_for(1438, 256, 0) == 5
    assert batch_for(1438, 256, 7) == 7
    r = trainer(3, "--batch-size", 600, "--run-dir", tmp_path)
    assert r.returncode == 2 and "fewer than one global batch (3 ranks x 600)" in r.stderr


def test_allgatherv_and_allreduce_in_pieces_match_one_call(tmp_path):
    r = mpi(3, [WORKERS / "large_messages.py", tmp_path])
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["pieces_used"] and report["equal"], report


COMPRESSORS = compress.names()


def tiny_flags(name):
    return ["--compressor", name, "--model", "user_models:tiny", "--rank", 2, "--start-compress-step", 1, *COMMON]


def three_steps_on_two_ranks(name):
    return 2, WORKERS / "train_and_dump.py", ["--steps", 3, *tiny_flags(name)]


@pytest.mark.parametrize("name", COMPRESSORS)
def test_resume_on_another_world_size_per_compressor(request, tmp_path_factory, name):
    """What README's table says: a residual kept per rank (ef_resume gather) ties the checkpoint to its
    world size and is refused elsewhere with one line; everything else re-shards and trains on. (The
    2-rank runs of every compressor share one launch; each resume is a process of its own.)"""
    run_dir = one_launch_per_world_size(request, tmp_path_factory, three_steps_on_two_ranks)
    flags = [*tiny_flags(name), "--run-dir", run_dir]
    with h5py.File(run_dir / "checkpoints" / "ckpt-000000003.h5", "r") as f:
        per_rank = "compressor/residual/per_rank" in f
    r = trainer(0, "--steps", 5, *flags)  # one process, no mpiexec: a world of 1
    if per_rank:
        assert r.returncode == 2 and "per-rank residuals of 2 ranks" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1
        r = trainer(0, "--steps", 5, "--ef-resume", "reset", *flags)
    assert r.returncode == 0, r.stderr
    assert "at step 3" in r.stdout and "done: 5 steps on 1 ranks" in r.stdout


def test_fuzzed_checkpoints_never_crash_or_hang_inspect_or_resume(tmp_path):
    flags = ["--steps", 4, "--checkpoint-every", 4, "--compressor", "greedylore", "--start-compress-step", 1,
             "--eval-every", 0, "--progress", "never", "--run-dir", tmp_path / "run"]
    assert trainer(0, *flags).returncode == 0
    good = tmp_path / "run" / "checkpoints" / "ckpt-000000004.h5"
    (tmp_path / "out").mkdir()
    shards = [subprocess.Popen([str(x) for x in (sys.executable, WORKERS / "fuzz_checkpoints.py", good,
                                                 tmp_path / "out", 0, f"{shard}/2", *flags)],
                               env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
              for shard in range(2)]  # side by side: most of a file's time is its checker process starting
    for shard in shards:
        _, stderr = shard.communicate(timeout=900)
        assert shard.returncode == 0, stderr[-3000:]
    lines = [json.loads(x) for shard in range(2) for x in open(tmp_path / "out" / f"results-{shard}.jsonl")]
    results = [x for x in lines if "file" in x]
    assert len(results) >= 300 and len(results) == len(lines) // 2  # every file started also finished
    for x in results:
        assert not x["escaped"], (x["file"], x["escaped"])
        for what in ("verify", "summary", "tree", "diff"):
            assert x[what] in ((0, 1, 2) if what == "verify" else (0, 2)), (x["file"], what, x)
            if x[what] == 2:  # one line, no traceback
                assert x[what + "_stderr"].count("\n") == 1 and "Traceback" not in x[what + "_stderr"], x
        assert x["resume"] in ("loaded", "refused")
        if x["kind"] == "structural":  # every hostile edit is named by --verify and refused by resume
            assert (x["verify"], x["resume"]) == (1, "refused"), x
        if x["kind"] == "truncate" or x["verify"]:
            assert x["resume"] == "refused", x


HOSTILE = {
    "step_is_text": lambda f: f.attrs.__setitem__("step", "ten"),
    "external_link": lambda f: (f.__delitem__("model/1.weight"),
                                f.__setitem__("model/1.weight", h5py.ExternalLink("x.h5", "/y"))),
    "huge": lambda f: (f.__delitem__("model/1.bias"),
                       f.create_dataset("model/1.bias", shape=(2**40,), dtype="f4", chunks=(2**16,))),
}


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A run dir with checkpoints at steps 2 and 4, trained once for every hostile edit."""
    folder = tmp_path_factory.mktemp("four_steps")
    assert trainer(2, "--run-dir", folder, "--steps", 4, "--checkpoint-every", 2, *COMMON).returncode == 0
    return folder


@pytest.mark.parametrize("edit", HOSTILE)
def test_a_hostile_checkpoint_is_one_line_exit_2_and_auto_falls_back(tmp_path, edit, four_steps):
    shutil.copytree(four_steps, tmp_path, dirs_exist_ok=True)
    newest = tmp_path / "checkpoints" / "ckpt-000000004.h5"
    with h5py.File(newest, "r+") as f:
        HOSTILE[edit](f)
    r = trainer(2, "--run-dir", tmp_path / "other", "--resume", newest, "--steps", 6, *COMMON)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    r = trainer(2, "--run-dir", tmp_path, "--steps", 6, *COMMON)
    assert r.returncode == 0, r.stderr
    assert "ckpt-000000004.h5 failed verification" in r.stdout and "at step 2" in r.stdout


def test_the_two_level_allreduce_is_the_flat_one_bit_for_bit_over_two_nodes(tmp_path):
    """Two nodes of two ranks (named by MPITRAIN_NODE, as `mpitrain emulate` names them): node
    reduce-scatter, network Allreduce, node allgather give the flat sum of integer-valued floats
    exactly, for fewer values than ranks, uneven shares and even ones."""
    block = lambda node: ["-n", "2", "env", f"{NODE_ENV}={node}", sys.executable,  # noqa: E731
                          WORKERS / "two_level.py", tmp_path]
    r = run([MPIEXEC, *block("a"), ":", *block("b")], timeout=60)
    assert r.returncode == 0, r.stderr
    got = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(4)]
    assert [(g["node"], g["local"]) for g in got] == [("a", [0, 2]), ("a", [1, 2]), ("b", [0, 2]), ("b", [1, 2])]
    assert all(g["agree"] == [True] * 4 for g in got)


def test_a_nodes_ranks_share_one_run_of_node_first_and_its_result(tmp_path):
    # every rank of a start-up used to spawn its own data-check process: 64 on one node took 6-7 s
    r = mpi(3, [WORKERS / "node_first.py", tmp_path], timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.glob("called-*")) == ["called-0"]
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in range(3)]
    assert [x["local_rank"] for x in results] == [0, 1, 2]  # one node here
    assert all(x["got"] == {"checked_by": 0, "faults": ["a fault line from the first rank"]} for x in results)
