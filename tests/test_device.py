"""Device ranks: the choice of device, what a device rank refuses, collectives staged through the
host, and (where CUDA is available) the default job on a GPU and its checkpoint resumed on the CPU."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from helpers import WORKERS, mpi, trainer
from mpitrain import compress, device
from mpitrain.config import Config, UsageError
from mpitrain.metrics import on_devices

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def test_auto_takes_the_cpu_without_cuda_and_cpu_is_always_the_cpu():
    assert device.choose("cpu", 3) == torch.device("cpu")
    if CUDA:
        assert device.choose("auto", 5) == torch.device("cuda", 5 % torch.cuda.device_count())
    else:
        assert device.choose("auto", 5) == torch.device("cpu")
        with pytest.raises(UsageError, match="--device cuda: this rank sees no CUDA device"):
            device.choose("cuda", 0)


@pytest.mark.parametrize("change,says", [({"kernels": "compiled"}, "--kernels compiled runs on the CPU only"),
                                         ({"average_every": 4}, "--average-every > 1 runs on the CPU only")])
def test_a_device_rank_refuses_in_one_line_what_runs_only_on_the_cpu(change, says):
    gpu = torch.device("cuda", 0)
    with pytest.raises(UsageError, match=says):
        device.check_supported(dataclasses.replace(Config(), **change), gpu)
    device.check_supported(dataclasses.replace(Config(), **change), torch.device("cpu"))  # all fine there
    for name in compress.names():  # on the device, or the quantizers on a host twin of the layout
        device.check_supported(dataclasses.replace(Config(), compressor=name), gpu)


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line_and_exit_2(tmp_path):
    r = trainer(1, "--device", "cuda", "--steps", "2", "--run-dir", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--device cuda: this rank sees no CUDA device" in r.stderr + r.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_start_up_line_names_each_nodes_devices_and_says_nothing_for_cpu_ranks():
    assert on_devices(["a", "a"], ["cpu", "cpu"]) == ""
    line = on_devices(["a", "a", "b", "b"], ["cuda:0 (X)", "cuda:0 (X)", "cuda:0 (X)", "cuda:1 (X)"])
    assert line == "; devices: a (cuda:0 (X)), b (cuda:0 (X), cuda:1 (X))"


def test_collectives_staged_through_the_host_give_the_bits_and_bytes_of_direct_ones(tmp_path):
    """A device rank's tensors go through a host buffer, and its quantizers run on a host twin of
    the layout; run here on CPU tensors, every collective, every device compressor's step and every
    quantizer's step give the same bits and count the same bytes as on the layout's own memory."""
    n = 3
    r = mpi(n, [WORKERS / "staged_wire.py", tmp_path])
    assert r.returncode == 0, r.stderr
    for k in range(n):
        got = dict(np.load(tmp_path / f"rank-{k}.npz"))
        names = [key[:-len("_equal")] for key in got if key.endswith("_equal")]
        assert set(names) >= {"sum", "max", "int16", "bcast", "dense", "powersgd", "greedylore", "greedylore-paper",
                              "sparse-dither", "qsgd", "topk", "natural"}
        for name in names:
            assert got[f"{name}_equal"], name
            assert got[f"{name}_bytes"][0] == got[f"{name}_bytes"][1], name
        assert got["dense_bytes"][0] > 0 and got["bcast_bytes"][0] == (36 * 4 if k == 0 else 0)


@needs_cuda
def test_the_default_job_on_two_ranks_sharing_a_gpu_reaches_the_cpu_jobs_accuracy_and_resumes_on_the_cpu(tmp_path):
    summaries = {}
    for where in ("cpu", "cuda"):
        r = trainer(2, "--device", where, "--compressor", "greedylore", "--run-dir", tmp_path / where, timeout=600)
        assert r.returncode == 0, r.stderr
        lines = (tmp_path / where / "metrics.jsonl").read_text().splitlines()
        summaries[where] = [json.loads(x) for x in lines if '"summary"' in x][-1]
    assert abs(summaries["cuda"]["eval_accuracy"] - summaries["cpu"]["eval_accuracy"]) <= 0.01
    r = trainer(2, "--device", "cpu", "--compressor", "greedylore", "--steps", 320, "--run-dir", tmp_path / "cuda",
                timeout=600)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
