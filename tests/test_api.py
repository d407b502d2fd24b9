"""The public API: a user's own loop (examples/) against the command, exact resume, user datasets."""
import json
import shutil
import sys

import h5py
import numpy as np
import pytest

from helpers import MPIEXEC, ROOT, mpi, run, trainer

EXAMPLE = ROOT / "examples" / "digits_loop.py"


def model_of(path):
    with h5py.File(path, "r") as f:
        return {k: f["model"][k][()] for k in f["model"]}


def example(n, run_dir, *flags):
    r = mpi(n, [EXAMPLE, "--run-dir", run_dir, *flags], timeout=180)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_example_loop_runs_without_arguments_into_a_default_run_dir(tmp_path):
    r = run([MPIEXEC, "-n", "2", sys.executable, EXAMPLE, "--steps", "20"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    made = list((tmp_path / "runs").iterdir())  # one folder, named by rank 0's clock on every rank
    assert len(made) == 1 and (made[0] / "checkpoints" / "ckpt-000000020.h5").is_file()


def test_the_example_loop_trains_like_the_command_and_resumes_exactly(tmp_path):
    mine = example(2, tmp_path / "mine")
    r = trainer(2, "--compressor", "greedylore", "--run-dir", tmp_path / "command", "--progress", "never")
    assert r.returncode == 0, r.stderr
    command = json.loads((tmp_path / "command" / "metrics.jsonl").read_text().splitlines()[-1])
    assert mine["eval_accuracy"] == command["eval_accuracy"] > 0.95
    final = model_of(tmp_path / "mine" / "checkpoints" / "ckpt-000000300.h5")
    ref = model_of(tmp_path / "command" / "checkpoints" / "ckpt-000000300.h5")
    assert all(np.array_equal(final[k], ref[k]) for k in ref)  # one path, not two: the same bits
    # resume: a run dir holding only the step-100 checkpoint goes on to the same step-300 weights
    ckpts = tmp_path / "resumed" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copy(tmp_path / "mine" / "checkpoints" / "ckpt-000000100.h5", ckpts)
    (ckpts / "latest").write_text("ckpt-000000100.h5\n")
    again = example(2, tmp_path / "resumed")
    resumed = model_of(ckpts / "ckpt-000000300.h5")
    assert all(np.array_equal(resumed[k], final[k]) for k in final)
    assert again["eval_accuracy"] == mine["eval_accuracy"]
    r = run([sys.executable, "-m", "mpitrain", "inspect", "--verify", ckpts / "ckpt-000000300.h5"])
    assert r.returncode == 0, r.stdout + r.stderr


def test_import_mpitrain_starts_neither_mpi_nor_torch():
    code = ("import sys, mpitrain; before = {m for m in ('mpi4py', 'torch') if m in sys.modules}; "
            "mpitrain.Exchange; print(sorted(before), 'mpi4py' in sys.modules)")
    r = run([sys.executable, "-c", code])
    assert r.returncode == 0 and r.stdout.split() == ["[]", "False"], r.stdout + r.stderr


@pytest.mark.parametrize("function", ["digits_arrays", "digits_torch"])
def test_a_user_dataset_function_trains_end_to_end(tmp_path, function):
    r = trainer(2, "--dataset", f"user_data:{function}", "--steps", 150, "--run-dir", tmp_path, "--progress", "never")
    assert r.returncode == 0, r.stderr
    assert f"mlp on user_data:{function} (1438 training rows)" in r.stdout
    summary = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["eval_accuracy"] > 0.9


@pytest.mark.parametrize("function,words", [("returns_nonsense", "must return (data, info)"),
                                            ("labels_missing", "one label per row"),
                                            ("no_such_function", "has no function")])
def test_a_broken_dataset_function_is_one_line_and_exit_2(tmp_path, function, words):
    r = trainer(2, "--dataset", f"user_data:{function}", "--run-dir", tmp_path)
    assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_plot_draws_two_runs_and_says_so_in_one_line_without_matplotlib(tmp_path):
    from matplotlib import image
    for name in ("dense", "greedylore"):
        r = trainer(2, "--compressor", name, "--steps", 60, "--eval-every", 20, "--run-dir", tmp_path / name)
        assert r.returncode == 0, r.stderr
    r = run([sys.executable, "-m", "mpitrain", "plot", tmp_path / "dense", tmp_path / "greedylore", "--out",
             tmp_path / "dense" / "config.json"])  # a file where the folder would go: one line
    assert r.returncode == 2 and r.stderr.strip().endswith("config.json is not a folder"), r.stderr
    r = run([sys.executable, "-m", "mpitrain", "plot", tmp_path / "dense", tmp_path / "greedylore", "--out",
             tmp_path / "plots"])
    assert r.returncode == 0, r.stderr
    for name in ("loss.png", "eval.png", "step_time.png"):
        pixels = image.imread(tmp_path / "plots" / name)
        assert pixels.ndim == 3 and pixels.shape[0] >= 300 and pixels.shape[1] >= 500, (name, pixels.shape)
        assert pixels[..., :3].std() > 0.05  # lines were drawn, not a blank canvas
    # a matplotlib that cannot be imported: one line, exit 2
    (tmp_path / "fake" / "matplotlib").mkdir(parents=True)
    (tmp_path / "fake" / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    r = run([sys.executable, "-m", "mpitrain", "plot", tmp_path / "dense"], PYTHONPATH=f"{tmp_path / 'fake'}:{ROOT}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pip install 'mpitrain[plot]'" in r.stderr, r.stderr


def test_plot_draws_a_resumed_run_as_one_curve(tmp_path):
    from mpitrain.plot import read_run, stitched
    # a run to step 45 with a checkpoint at 30, resumed from that checkpoint to step 60
    r = trainer(2, "--steps", 45, "--checkpoint-every", 30, "--eval-every", 15, "--run-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    r = trainer(2, "--steps", 60, "--eval-every", 15, "--run-dir", tmp_path,
                "--resume", tmp_path / "checkpoints" / "ckpt-000000030.h5")
    assert r.returncode == 0, r.stderr
    run = read_run(tmp_path)
    assert [x["step"] for x in run["train"]] == [10, 20, 30, 40, 50, 60]
    assert [x["step"] for x in run["eval"]] == [15, 30, 45, 60]
    times = [x["elapsed_s"] for x in run["train"]]
    assert times == sorted(times)
    # each run's clock starts at 0; a resumed one continues from the last record kept before it
    records = [{"step": s, "elapsed_s": t} for s, t in [(10, 1.0), (20, 2.0), (30, 3.0), (40, 4.0), (31, 0.5),
                                                        (40, 1.5), (50, 2.5), (51, 0.2), (60, 1.2)]]
    assert [(x["step"], x["elapsed_s"]) for x in stitched(records)] == \
        [(10, 1.0), (20, 2.0), (30, 3.0), (31, 3.5), (40, 4.5), (50, 5.5), (51, 5.7), (60, 6.7)]


def test_tensorboard_events_or_a_clear_line_when_the_extra_is_missing(tmp_path):
    r = trainer(2, "--steps", 20, "--tensorboard", "--run-dir", tmp_path)
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        assert r.returncode == 2 and "pip install 'mpitrain[tensorboard]'" in r.stderr, r.stderr
        return
    assert r.returncode == 0, r.stderr
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert np.allclose(losses, [x["loss"] for x in lines]) and "eval/eval_accuracy" in events.Tags()["scalars"]
