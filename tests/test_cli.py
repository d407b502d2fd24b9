"""The command line contract: config precedence, outputs, exit codes, one-line errors, aborts."""
import json
import os
import re
import time

import pytest

from helpers import ROOT, trainer
from mpitrain.config import FIELDS
from mpitrain.layout import CONTROL


def test_default_job_runs_alone_and_writes_its_outputs(tmp_path):
    r = trainer(0, "--run-dir", tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "done: 300 steps on 1 ranks" in r.stdout
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"] == "mlp" and cfg["steps"] == 300
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    evals = [x for x in lines if x["kind"] == "eval"]
    summary = [x for x in lines if x["kind"] == "summary"][0]
    assert [x["step"] for x in train] == list(range(10, 301, 10))
    for x in train:
        assert {"step", "loss", "lr", "wire_bytes", "dense_bytes", "step_time_s"} <= x.keys()
        # dense fp32 gradients + control words, + one 8-byte checksum per rank on sync-check steps
        assert x["wire_bytes"] == x["dense_bytes"] + 4 * len(CONTROL) + (8 if x["step"] % 200 == 0 else 0)
    assert [x["step"] for x in evals] == [100, 200, 300]
    assert summary["eval_accuracy"] > 0.9  # a real model learned the real digits
    assert train[-1]["loss"] < train[0]["loss"]


def test_print_config_precedence_cli_over_env_over_file_over_defaults(tmp_path):
    (tmp_path / "run.toml").write_text('steps = 7\nbatch-size = 5\nlr = 1\nseed = 3\n')
    r = trainer(0, "--config", tmp_path / "run.toml", "--print-config", "--steps", 9,
                MPITRAIN_STEPS="8", MPITRAIN_BATCH_SIZE="6")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert (cfg["steps"], cfg["batch_size"], cfg["lr"], cfg["seed"], cfg["momentum"]) == (9, 6, 1.0, 3, 0.9)


BAD = [
    # (flags, environment, file text, what the one line must mention)
    (["--steps", "-3"], {}, None, "steps"),
    (["--steps", "ten"], {}, None, "expected int"),
    (["--model", "nosuchmodel"], {}, None, "unknown model"),
    (["--dataset", "nosuchset"], {}, None, "unknown dataset"),
    (["--dataset", "missing/file.h5"], {}, None, "not found"),
    (["--optimizer", "lbfgs"], {}, None, "must be one of"),
    (["--compressor", "zip"], {}, None, "unknown compressor"),
    (["--no-such-flag"], {}, None, "unrecognized"),
    (["--model", "no_such_module:build"], {}, None, "cannot import"),
    (["--model", "user_models:not_a_module"], {}, None, "not a torch.nn.Module"),
    (["--model", "user_models:half_precision"], {}, None, "float32"),
    (["--model", "transformer"], {}, None, "character LM"),
    (["--batch-size", "100000"], {}, None, "fewer than one global batch"),
    ([], {"MPITRAIN_STEPZ": "3"}, None, "MPITRAIN_STEPZ"),
    ([], {"MPITRAIN_LR": "fast"}, None, "expected float"),
    ([], {}, "stepz = 3\n", "unknown config key"),
    ([], {}, "steps = 2.5\n", "expected int"),
    ([], {}, "steps = [\n", "not valid TOML"),
    (["--config", "does/not/exist.toml"], {}, None, "not found"),
    (["--config", "tests"], {}, None, "cannot read config file tests: Is a directory"),
    (["--lr", "inf"], {}, None, "must be a finite number"),
    (["--hierarchy", "node", "--compressor", "auto"], {}, None, "--hierarchy node: --compressor auto"),
    (["--hierarchy", "node", "--average-every", "4"], {}, None, "--hierarchy node: --average-every"),
]


@pytest.mark.parametrize("flags,environ,text,mention", BAD, ids=[b[3] + str(i) for i, b in enumerate(BAD)])
def test_a_users_mistake_is_one_line_and_exit_2(tmp_path, flags, environ, text, mention):
    if text is not None:
        (tmp_path / "run.toml").write_text(text)
        flags = ["--config", tmp_path / "run.toml"] + flags
    r = trainer(0, *flags, "--run-dir", tmp_path / "run", **environ)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpitrain: error: "), r.stderr
    assert mention in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_run_dir_where_a_file_is_is_refused_with_one_line(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for run_dir in (notes, notes / "run"):
        r = trainer(0, "--run-dir", run_dir)
        assert r.returncode == 2 and r.stderr.strip() == f"mpitrain: error: run dir {run_dir}: {notes} is not a folder"
    assert notes.read_text() == "mine"


def test_a_full_disk_under_the_metrics_is_one_line_and_exit_1(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    r = trainer(2, "--steps", 20, "--run-dir", tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("mpitrain:")]
    assert lines == [f"mpitrain: error: rank 0, step 10: cannot write {tmp_path / 'metrics.jsonl'}: "
                     "No space left on device"]


def test_a_mistake_under_mpiexec_exits_2_on_every_rank_with_one_line(tmp_path):
    r = trainer(4, "--dataset", "nosuchset", "--run-dir", tmp_path / "run")
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("mpitrain: error:") == 1 and "Traceback" not in r.stderr


def torch_that_fails(folder):
    """PYTHONPATH on which `import torch` raises: a run that gets past it never imported torch."""
    (folder / "torch").mkdir()
    (folder / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    return os.pathsep.join([str(folder), str(ROOT)])


EARLY = [(["--no-such-flag"], "unrecognized"), (["--compressor", "greedylor"], "unknown compressor"),
         (["--steps", "ten"], "expected int"), (["--alpha", "2"], "alpha")]


@pytest.mark.parametrize("flags,mention", EARLY, ids=[e[1] for e in EARLY])
def test_a_mistaken_flag_is_reported_before_any_rank_imports_torch(tmp_path, flags, mention):
    # at scale, every rank reading torch from a shared filesystem takes a minute or more
    r = trainer(2, *flags, PYTHONPATH=torch_that_fails(tmp_path))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("mpitrain: error:") == 1 and mention in r.stderr and "torch was imported" not in r.stderr


def test_print_config_needs_no_torch_and_a_good_job_does(tmp_path):
    path = torch_that_fails(tmp_path)
    r = trainer(2, "--print-config", "--steps", 3, PYTHONPATH=path)
    assert r.returncode == 0 and json.loads(r.stdout)["steps"] == 3, r.stderr
    r = trainer(2, "--steps", 3, "--run-dir", tmp_path / "run", PYTHONPATH=path)
    assert r.returncode not in (0, 2), r.stderr  # aborted on the exception, not mistaken for a usage error
    assert "start-up: ImportError: torch was imported" in r.stderr


def test_an_exception_on_one_rank_aborts_the_whole_job(tmp_path):
    started = time.monotonic()
    r = trainer(2, "--model", "user_models:raises_on_rank1_step3", "--run-dir", tmp_path, timeout=60)
    assert time.monotonic() - started < 20
    assert r.returncode not in (0, 2)
    assert "mpitrain: rank 1, step 3: RuntimeError: deliberate failure" in r.stderr


def test_help_is_printed_once_under_mpiexec_fits_a_screen_and_help_all_lists_every_flag():
    r = trainer(2, "--help", COLUMNS="80")
    assert r.returncode == 0
    assert r.stdout.count("usage: mpiexec -n N python -m mpitrain") == 1 and "--batch-size" in r.stdout
    assert len(r.stdout.splitlines()) <= 52 and "--help-all" in r.stdout and "--bucket-mb" not in r.stdout
    everything = trainer(0, "--help-all").stdout
    assert all(re.search(f"--{name.replace('_', '-')}[ ,\n]", everything) for name in FIELDS)


def test_no_mpi_library_is_one_line_saying_how_to_get_one():
    r = trainer(0, "--steps", 1, MPI4PY_LIBMPI="/nonexistent/libmpi.so")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "no MPI found" in r.stderr and "pip install 'mpitrain[mpich]'" in r.stderr


def test_jobs_started_in_the_same_second_get_their_own_default_run_dirs():
    from mpitrain.config import default_run_dir
    start = 1796691600.0  # 2026-12-08T01:00:00Z
    names = [default_run_dir(start + dt) for dt in (0.0, 0.25, 0.5)]
    assert names == ["runs/20261208T010000.000Z", "runs/20261208T010000.250Z", "runs/20261208T010000.500Z"]
