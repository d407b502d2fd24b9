"""Checkpoints under a real mpiexec: exact resume, world-size changes, NaN policy, preemption, kills."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from helpers import MPIEXEC, ROOT, WORKERS, env, mpi, run, runs_in_one_launch, trainer, two_nodes
from mpitrain import checkpoint

COMMON = ["--lr-schedule", "constant", "--warmup-steps", 0, "--eval-every", 0, "--log-every", 1]


def run_and_dump(folder, n, *flags):
    folder.mkdir(exist_ok=True)
    r = mpi(n, [WORKERS / "train_and_dump.py", folder, *COMMON, "--run-dir", folder, *flags])
    assert r.returncode == 0, r.stderr
    return np.load(folder / "params-0.npy"), r


def runs_and_dumps(n, *runs):
    """run_and_dump for each (folder, flags...) of runs, in one launch. A resume never shares one with
    the run that wrote its checkpoint: it must read everything it needs from the file."""
    for folder, *_ in runs:
        folder.mkdir(exist_ok=True)
    r = runs_in_one_launch(n, WORKERS / "train_and_dump.py",
                           [[folder, *COMMON, "--run-dir", folder, *flags] for folder, *flags in runs])
    assert r.returncode == 0, r.stderr
    return [np.load(folder / "params-0.npy") for folder, *_ in runs], r


def losses(folder):
    return np.array([json.loads(x)["loss"] for x in open(folder / "metrics.jsonl") if '"train"' in x])


def model_of(path):
    with h5py.File(path, "r") as f:
        return {k: f["model"][k][()] for k in f["model"]}


@pytest.mark.parametrize("compressor,optimizer,extra", [
    ("dense", "sgd", []), ("dense", "adam", []), ("greedylore", "sgd", []), ("greedylore", "adam", []),
    ("greedylore", "adam", ["--factor-bits", 32]), ("greedylore-paper", "adam", []),
    ("powersgd", "sgd", []), ("powersgd", "adamw", []),
    ("topk", "sgd", ["--quantizer-exchange", "sharded", "--ratio", 0.1])])
def test_resume_equals_an_uninterrupted_run(tmp_path, compressor, optimizer, extra):
    flags = ["--compressor", compressor, "--optimizer", optimizer, "--lr", 0.01 if optimizer != "sgd" else 0.05,
             "--start-compress-step", 3, "--refresh-every", 4, "--rank", 4, "--model", "cnn", *extra]
    # 16-bit greedylore rounds each rank's own Q, so only every rank's residual resumes it exactly
    # (the quantizers' residuals are every rank's own in either exchange)
    linear = compressor in ("greedylore", "greedylore-paper", "powersgd") and not (compressor == "greedylore" and not extra)
    policies = ["gather", "mean"] if linear else ["gather"]
    (whole, *_), _ = runs_and_dumps(2, (tmp_path / "whole", "--steps", 20, *flags),
                                    *[(tmp_path / p, "--steps", 10, "--ef-resume", p, *flags) for p in policies])
    assert all((tmp_path / p / "checkpoints" / "ckpt-000000010.h5").is_file() for p in policies)
    resumed_runs, r = runs_and_dumps(2, *[(tmp_path / p, "--steps", 20, "--ef-resume", p, *flags) for p in policies])
    assert r.stdout.count("resumed from") == r.stdout.count("ckpt-000000010.h5") == len(policies), r.stdout
    for policy, resumed in zip(policies, resumed_runs):
        part = tmp_path / policy
        steps = [json.loads(x)["step"] for x in open(part / "metrics.jsonl") if '"train"' in x]
        assert steps == list(range(1, 21))
        start = np.load(part / "params-init.npy")
        assert not np.array_equal(resumed, start)
        if policy == "gather":
            assert np.array_equal(resumed, whole)
            continue
        # mean: the residuals' sum is summed in another order, so gradients differ by rounding
        assert np.allclose(losses(part)[-20:], losses(tmp_path / "whole"), rtol=1e-5, atol=0)
        if optimizer == "sgd":
            assert np.abs(resumed - whole).max() < 1e-5
        else:
            # Adam divides by sqrt(v): in rows of dead units the reconstruction leaves only rounding
            # noise (~1e-10), which Adam turns into full +-lr steps, so those weights wander by
            # rounding alone (they feed nothing: the losses above agree to 1e-5). Bound the whole.
            assert np.linalg.norm(resumed - whole) < 1e-2 * np.linalg.norm(whole - start)


@pytest.mark.parametrize("compressor,policy", [("greedylore", "gather"), ("powersgd", "mean")])
def test_the_two_level_exchange_resumes_as_it_would_have_run_on(tmp_path, compressor, policy):
    """--hierarchy node on two nodes of two ranks: each share's residual and basis are saved in a flat
    compressor's places and come back to the share's ranks: every rank's own (gather) resumes bit
    for bit, the ranks' sum (mean) to rounding."""
    flags = [*COMMON, "--compressor", compressor, "--hierarchy", "node", "--start-compress-step", 3,
             "--refresh-every", 4, "--rank", 2, "--ef-resume", policy]

    def train(*runs):  # (folder, steps) of each run, in one launch
        for folder, _ in runs:
            folder.mkdir(exist_ok=True)
        args = json.dumps([[str(folder), *map(str, flags), "--steps", str(steps)] for folder, steps in runs])
        r = run(two_nodes(WORKERS / "runs.py", WORKERS / "train_and_dump.py", args))
        assert r.returncode == 0, r.stderr
        return r
    train((tmp_path / "whole", 16), (tmp_path / "part", 8))
    r = train((tmp_path / "part", 16))  # never in the process that wrote its checkpoint
    whole, resumed = (np.load(tmp_path / folder / "params-0.npy") for folder in ("whole", "part"))
    assert "resumed from" in r.stdout and "ckpt-000000008.h5" in r.stdout
    assert not np.array_equal(resumed, np.load(tmp_path / "part" / "params-init.npy"))
    if policy == "gather":
        assert np.array_equal(resumed, whole)
    else:
        assert np.allclose(losses(tmp_path / "part")[-16:], losses(tmp_path / "whole"), rtol=1e-5, atol=0)
    with h5py.File(tmp_path / "part" / "checkpoints" / "ckpt-000000008.h5", "r") as f:  # a flat compressor's names
        assert set(f["compressor/residual"][policy if policy == "mean" else "per_rank"]) >= {"1.weight", "3.weight"}


def test_resume_on_another_world_size_trains_on_for_linear_compressors(tmp_path):
    flags = ["--compressor", "greedylore", "--start-compress-step", 3, "--refresh-every", 50]
    # 16-bit greedylore keeps every rank's residual by default (auto = gather); mean re-shards their sum
    run_and_dump(tmp_path, 4, "--steps", 10, "--ef-resume", "mean", *flags)
    params, r = run_and_dump(tmp_path, 2, "--steps", 25, "--ef-resume", "mean", *flags)
    assert "at step 10" in r.stdout
    losses = [json.loads(x)["loss"] for x in open(tmp_path / "metrics.jsonl") if '"train"' in x]
    assert len(losses) == 25 and np.mean(losses[-5:]) < np.mean(losses[:5])
    # every rank's residual was stored only for gather: another world size is refused clearly
    r = trainer(2, "--run-dir", tmp_path, "--steps", 30, "--ef-resume", "gather", *flags, *COMMON)
    assert r.returncode == 0, r.stderr  # the latest file holds a mean residual: fine on any size
    r = trainer(4, "--run-dir", tmp_path, "--steps", 35, "--ef-resume", "gather", *flags, *COMMON)
    assert r.returncode == 2 and "per-rank residuals of 2 ranks" in r.stderr


def test_non_finite_gradients_are_skipped_on_every_rank(tmp_path):
    r = trainer(2, "--model", "user_models:nan_on_rank1_step3", "--steps", 8, "--run-dir", tmp_path, *COMMON)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl") if '"train"' in x]
    assert [x["skipped_steps"] for x in lines] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert [x["skipped"] for x in lines] == [False, False, True] + [False] * 5
    assert not checkpoint.verify(tmp_path / "checkpoints" / "ckpt-000000008.h5")
    # the printed lines do not show a skipped step's recorded 0.0 as its loss
    assert "step 3/8 loss skipped (non-finite)" in r.stdout and "1 of 8 steps skipped" in r.stdout


@pytest.mark.parametrize("bad", [0, 1])
def test_parameters_gone_non_finite_end_the_job_at_the_checkpoint_with_one_line(tmp_path, bad):
    # a huge learning rate can overflow the parameters with finite gradients: no gradient check sees it
    r = mpi(2, [WORKERS / "save_diverged.py", tmp_path, bad], timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("mpitrain:")]
    assert lines == [f"mpitrain: error: rank {bad}, step 7: refusing to write a checkpoint at step 7: the parameters "
                     "hold NaN or Inf (the run diverged; the checkpoints before it are intact)"]
    assert not list(tmp_path.rglob("*.h5*"))
    assert mpi(2, [WORKERS / "save_diverged.py", tmp_path, -1], timeout=60).stdout.count("saved") == 2


def test_non_finite_gradients_abort_when_asked(tmp_path):
    r = trainer(2, "--model", "user_models:nan_on_rank1_step3", "--steps", 8, "--nan-policy", "abort",
                "--run-dir", tmp_path, "--checkpoint-every", 1, *COMMON)
    assert r.returncode == 1
    assert r.stderr.count("non-finite gradients at step 3") == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*")) == \
        ["ckpt-000000001.h5", "ckpt-000000002.h5"]


def test_auto_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    trainer(1, "--run-dir", tmp_path, "--steps", 6, "--checkpoint-every", 2, "--keep-last", 0, *COMMON)
    newest = tmp_path / "checkpoints" / "ckpt-000000006.h5"
    corrupt(newest)
    assert checkpoint.verify(newest)
    r = trainer(1, "--run-dir", tmp_path, "--steps", 8, *COMMON)
    assert r.returncode == 0, r.stderr
    assert "ckpt-000000006.h5 failed verification" in r.stdout
    assert "resuming from ckpt-000000004.h5 instead" in r.stdout and "at step 4" in r.stdout


def corrupt(path):
    """Flip bytes inside the first chunk of the largest model dataset (checksum must catch it)."""
    with h5py.File(path, "r") as f:
        name = max(f["model"], key=lambda k: f["model"][k].size)
        offset = f["model"][name].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 16)
        data = bytearray(fh.read(8))
        fh.seek(offset + 16)
        fh.write(bytes(b ^ 0xFF for b in data))
    return name



def test_auto_resume_refuses_intact_checkpoints_of_another_configuration_and_leaves_them(tmp_path):
    """A rerun into a run dir with other state-shaping flags must not start over on top of its
    checkpoints (keep-last would delete them): one line, exit 2, every file as it was."""
    flags = ["--run-dir", tmp_path, "--steps", 6, "--keep-last", 1, *COMMON]
    r = trainer(0, *flags[:3], 4, "--checkpoint-every", 2, "--compressor", "greedylore", "--start-compress-step", 1,
                *COMMON)
    assert r.returncode == 0, r.stderr
    files = lambda: {p: p.read_bytes() for p in [tmp_path / "config.json", *(tmp_path / "checkpoints").iterdir()]}  # noqa: E731
    before = files()
    newest = tmp_path / "checkpoints" / "ckpt-000000004.h5"
    for other, says in ((["--compressor", "powersgd"], "it was written with --compressor greedylore (this run: powersgd)"),
                        (["--compressor", "greedylore", "--rank", 2], "it was written with --rank 4 (this run: 2)"),
                        (["--compressor", "greedylore", "--model", "wide-mlp"], "does not fit this model")):
        r = trainer(0, *flags, *other)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"cannot resume from {newest}: " in r.stderr and says in r.stderr, r.stderr
        assert "another --run-dir" in r.stderr and files() == before
    corrupt(newest)  # damaged, and the one before it intact but of another configuration: still refused
    r = trainer(0, *flags, "--compressor", "powersgd")
    assert r.returncode == 2 and "ckpt-000000004.h5 failed verification" in r.stdout, r.stdout
    assert f"cannot resume from {newest.with_name('ckpt-000000002.h5')}: " in r.stderr
    r = trainer(0, *flags, "--compressor", "greedylore", "--start-compress-step", 1)
    assert r.returncode == 0 and "resuming from ckpt-000000002.h5 instead" in r.stdout, r.stderr


def test_a_second_job_into_a_run_dir_in_use_is_refused_and_the_lock_dies_with_its_holder(tmp_path):
    first = subprocess.Popen([sys.executable, "-m", "mpitrain", "--run-dir", str(tmp_path), "--steps", str(10 ** 7),
                              "--progress", "never", "--eval-every", "0", "--log-every", "100000"],
                             env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "config.json").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None and (tmp_path / "config.json").exists(), first.stderr.read()
        config = (tmp_path / "config.json").read_text()
        r = trainer(2, "--run-dir", tmp_path, "--steps", 4, "--checkpoint-every", 2, *COMMON)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"run dir {tmp_path} is in use by another job (pid {first.pid} on " in r.stderr, r.stderr
        assert first.poll() is None and (tmp_path / "config.json").read_text() == config
        assert not (tmp_path / "checkpoints").exists()
    finally:
        first.kill()
        first.wait()
    r = trainer(2, "--run-dir", tmp_path, "--steps", 4, "--checkpoint-every", 2, *COMMON)  # killed: its lock is gone
    assert r.returncode == 0 and (tmp_path / "checkpoints" / "ckpt-000000004.h5").exists(), r.stderr

def test_resume_none_sets_the_earlier_run_aside_and_starts_clean(tmp_path):
    assert trainer(0, "--run-dir", tmp_path, "--steps", 6, "--checkpoint-every", 3, *COMMON).returncode == 0
    earlier = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    r = trainer(0, "--run-dir", tmp_path, "--steps", 4, "--resume", "none", *COMMON)
    assert r.returncode == 0, r.stderr
    [aside] = tmp_path.glob("earlier-*")
    assert f"--resume none: the earlier run's files in {tmp_path} are now in {aside}" in r.stdout
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == earlier
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-000000004.h5", "latest"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 4


def test_a_resume_at_or_past_steps_trains_nothing_and_says_so(tmp_path):
    assert trainer(0, "--run-dir", tmp_path, "--steps", 4, "--checkpoint-every", 2, *COMMON).returncode == 0
    r = trainer(0, "--run-dir", tmp_path, "--steps", 2, *COMMON)
    assert r.returncode == 0 and "done: nothing left to train, resumed at or past --steps 2;" in r.stdout, r.stdout
    summary = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert (summary["kind"], summary["steps_run"], summary["dense_bytes_per_rank"], summary["wire_bytes_per_rank"]) == \
        ("summary", 0, 0, 0)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "ckpt-000000004.h5"


def test_keep_last_and_latest(tmp_path):
    r = trainer(1, "--run-dir", tmp_path, "--steps", 9, "--checkpoint-every", 2, "--keep-last", 2, *COMMON)
    assert r.returncode == 0, r.stderr
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt-000000008.h5", "ckpt-000000009.h5", "latest"]
    assert (ckpts / "latest").read_text().strip() == "ckpt-000000009.h5"
    assert oct((ckpts / "ckpt-000000009.h5").stat().st_mode & 0o777) == "0o644"


def test_sigusr1_checkpoints_exits_75_and_a_rerun_finishes_like_an_uninterrupted_run(tmp_path):
    flags = ["--steps", 3000, "--log-every", 10, "--eval-every", 0]
    script = [str(ROOT / "jobs" / "local.sh")]
    e = env(PYTHON=sys.executable, NP="2")
    whole = subprocess.run(script + ["--run-dir", str(tmp_path / "whole"), *map(str, flags)], env=e,
                           capture_output=True, text=True, timeout=180)
    assert whole.returncode == 0, whole.stderr
    run_dir = tmp_path / "cut"
    proc = subprocess.Popen(script + ["--run-dir", str(run_dir), *map(str, flags)], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "exit 75 asks the job script to requeue" in err
    stopped_at = checkpoint.step_of(run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip())
    assert 200 <= stopped_at < 3000
    again = subprocess.run(script + ["--run-dir", str(run_dir), *map(str, flags)], env=e,
                           capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    assert f"at step {stopped_at}" in again.stdout
    a, b = model_of(run_dir / "checkpoints" / "ckpt-000003000.h5"), model_of(tmp_path / "whole" / "checkpoints" /
                                                                          "ckpt-000003000.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_ctrl_c_checkpoints_and_exits_75_in_one_line(tmp_path):
    """A terminal's Ctrl-C signals mpiexec and every rank (the whole foreground group): the ranks
    agree on the stop, checkpoint and exit 75, with no traceback."""
    job = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "mpitrain", "--run-dir", str(tmp_path),
                            "--steps", str(10 ** 7), "--progress", "never", "--eval-every", "0", "--log-every", "1000"],
                           env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "config.json").exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # config.json: training has begun, the stop handlers are in place
        os.killpg(job.pid, signal.SIGINT)
        out, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 75 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    [line] = [x for x in err.splitlines() if x.startswith("mpitrain:")]
    saved = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert line.startswith(f"mpitrain: stop requested by signal: checkpoint {saved} written after step ")
    assert checkpoint.verify(saved) == []


def test_a_second_ctrl_c_ends_the_process_at_once_but_one_arriving_twice_does_not():
    script = """
import os, signal, time
from mpitrain import launch
launch.catch_stop_signals()
os.kill(os.getpid(), signal.SIGINT)
os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C, through mpiexec
print("stop requested", launch.stop_requested(), flush=True)
time.sleep(launch.AGAIN_S + 0.2)
os.kill(os.getpid(), signal.SIGINT)  # pressed again
time.sleep(5)
print("still here", flush=True)
"""
    r = run([sys.executable, "-c", script], timeout=60)
    assert r.returncode == -signal.SIGINT and r.stdout == "stop requested True\n", (r.returncode, r.stdout, r.stderr)


def test_sigkill_during_checkpoint_writes_never_breaks_latest(tmp_path):
    rng = random.Random(0)
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpitrain", "--model", "user_models:big_mlp",
           "--run-dir", str(tmp_path), "--checkpoint-every", 1, "--keep-last", 2, "--steps", 100000,
           "--lr", "0.001", *map(str, COMMON)]
    ckpts = tmp_path / "checkpoints"
    kills = 0
    for attempt in range(6):
        proc = subprocess.Popen([str(c) for c in cmd], env=env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = (ckpts / "latest").read_text() if (ckpts / "latest").exists() else ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and ((ckpts / "latest").read_text() if (ckpts / "latest").exists()
                                               else "") == before:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))  # somewhere inside the next writes
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
        latest = ckpts / (ckpts / "latest").read_text().strip()
        assert checkpoint.verify(latest) == [], latest
        for p in ckpts.glob("ckpt-*.h5"):
            assert checkpoint.verify(p) == [], p
    assert kills == 6
    steps_before = checkpoint.step_of(ckpts / (ckpts / "latest").read_text().strip())
    r = trainer(2, "--model", "user_models:big_mlp", "--run-dir", tmp_path, "--steps", steps_before + 2,
                "--lr", 0.001, *COMMON, timeout=180)
    assert r.returncode == 0, r.stderr
    assert f"at step {steps_before}" in r.stdout


def test_a_quota_that_free_space_does_not_show_ends_the_job_at_once_with_one_line(tmp_path):
    # from the checkpoint at step 150 on, no file may pass 300 kB (each is ~0.75 MB): the disk shows
    # free space, HDF5's write fails mid-file (before: a multi-line OSError raised in a data read on
    # the training thread, or a segfault while HDF5 closed the file)
    flags = ["--steps", 300, "--checkpoint-every", 50, "--run-dir", tmp_path]
    r = mpi(2, [WORKERS / "file_size_limit.py", 300_000, 150, *flags])
    assert r.returncode == 1, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("mpitrain:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr and "HDF5" not in r.stderr, r.stderr
    head, _, message = lines[0].partition(": cannot write checkpoint ")
    assert head.startswith("mpitrain: error: rank 0, step ")
    assert 150 < int(head.rsplit(" ", 1)[1]) < 200, lines[0]  # the next step's average raised it, not the next save
    assert message == (f"ckpt-000000150.h5 in {tmp_path / 'checkpoints'}: File too large; "
                       "the last checkpoint, ckpt-000000100.h5, is intact"), lines[0]
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt-000000050.h5", "ckpt-000000100.h5", "latest"]
    r = trainer(2, *flags, "--resume", "auto")
    assert r.returncode == 0, r.stderr
    assert f"resumed from {ckpts / 'ckpt-000000100.h5'} at step 100" in r.stdout and "done: 300 steps" in r.stdout


def test_a_full_disk_ends_the_job_with_one_line_and_leaves_the_last_checkpoint_to_resume(tmp_path):
    # a disk with room for two checkpoints of the default MLP (0.76 MB each) and the run's logs, not three
    flags = ["--steps", 300, "--checkpoint-every", 50, "--run-dir", tmp_path]
    r = mpi(2, [WORKERS / "small_disk.py", 2_000_000, *flags])
    assert r.returncode == 1, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("mpitrain:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("mpitrain: error: rank 0, step 150: no space for checkpoint ckpt-000000150.h5")
    assert "the last checkpoint, ckpt-000000100.h5, is intact" in lines[0]
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt-000000050.h5", "ckpt-000000100.h5", "latest"]
    r = trainer(2, *flags, "--resume", "auto")  # room again
    assert r.returncode == 0, r.stderr
    assert f"resumed from {ckpts / 'ckpt-000000100.h5'} at step 100" in r.stdout and "done: 300 steps" in r.stdout


FORMAT2 = {"greedylore-adam": ["--compressor", "greedylore", "--rank", 2, "--start-compress-step", 2,
                               "--optimizer", "adam", "--sketch-bits", 32],  # the sketch of its day
           "sparse-dither": ["--compressor", "sparse-dither", "--error-feedback", "on"]}


def flat_datasets(path) -> dict:
    """Every dataset of a checkpoint as a flat array, keyed as format 2 keys it: optimizer state by
    parameter index, the compressor's per-parameter pieces joined in the layout's order (matrices
    first, each group in the model's order)."""
    out = {}
    with h5py.File(path) as f:
        names = json.loads(f["optimizer"].attrs["param_names"])
        order = sorted(names, key=lambda n: (f[f"model/{n}"].ndim < 2, names.index(n)))
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
        groups = ("compressor/shared/bases", "compressor/shared/warm", "compressor/shared/ranks", "compressor/shared/q",
                  "compressor/residual/per_rank", "compressor/residual/mean")
        for group in [g for g in groups if isinstance(f.get(g), h5py.Group)]:
            pieces = [out.pop(f"{group}/{n}") for n in order if n in f[group]]
            rows = group.endswith("per_rank")
            out[group] = np.concatenate([p.reshape(p.shape[0], -1) if rows else p.reshape(-1) for p in pieces], axis=-1)
        for key in [k for k in out if k.startswith("optimizer/state/")]:
            _, _, name, entry = key.split("/")
            if not name.isdigit():
                out[f"optimizer/state/{names.index(name)}/{entry}"] = out.pop(key)
    out.pop("config")
    return out


@pytest.mark.parametrize("job", sorted(FORMAT2))
def test_a_format_2_checkpoint_loads_whole_and_resumes(tmp_path, job):
    """A checkpoint of the previous format (tests/data, written by mpitrain 0.2.0 at step 12 on 2
    ranks) loads into every part of the run: saved again at once it holds, in format 3 and by
    parameter name, the very values it held; and training resumes from it."""
    old = ROOT / "tests" / "data" / f"format2-{job}.h5"
    flags = ["--model", "user_models:tiny", "--seed", 3, "--resume", old, "--lr-schedule", "constant",
             "--warmup-steps", 0, "--eval-every", 0, *FORMAT2[job]]
    r = mpi(2, [WORKERS / "load_and_save.py", *flags, "--run-dir", tmp_path / "again"])
    assert r.returncode == 0, r.stderr
    again = tmp_path / "again" / "checkpoints" / "ckpt-000000012.h5"
    with h5py.File(old) as f, h5py.File(again) as g:
        assert (int(f.attrs["format_version"]), int(g.attrs["format_version"])) == (2, 3)
    before, after = flat_datasets(old), flat_datasets(again)
    assert sorted(before) == sorted(after)
    assert [k for k in before if before[k].tobytes() != after[k].tobytes()] == []
    r = trainer(2, *flags, "--steps", 14, "--run-dir", tmp_path / "on")
    assert r.returncode == 0 and f"resumed from {old} at step 12" in r.stdout, r.stderr
    steps = [rec["step"] for rec in map(json.loads, (tmp_path / "on" / "metrics.jsonl").read_text().splitlines())
             if rec.get("kind") == "train"]
    assert steps[-1] == 14
    if "--sketch-bits" in flags:  # today's default sketch buys other ranks: one line names the setting to use
        r = trainer(2, *flags[:-2], "--steps", 14, "--run-dir", tmp_path / "default")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "it was written with --sketch-bits 32 (this run: 16): resume with those settings" in r.stderr
