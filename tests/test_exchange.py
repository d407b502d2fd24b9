"""Data parallelism under a real mpiexec: what the ranks hold after they exchange gradients."""

import json

import numpy as np
import pytest

from helpers import WORKERS, mpi, one_launch_per_world_size, run, runs_in_one_launch, two_nodes
from mpitrain.comm import STALLED


def test_the_two_level_exchange_is_a_flat_exchange_of_the_node_sums(tmp_path):
    """--hierarchy node over two nodes of two ranks: each step's gradients equal, bit for bit, those of
    a flat exchange among the nodes of their summed gradients (dense; powersgd, greedylore-paper and
    top-k, whose selections and factors are per matrix), the agreed loss is every rank's mean, every
    rank ends with the same parameters, a node's network bytes are one rank's flat payload plus
    the control words each share carries (12 bytes each but the last's), and a checkpoint loaded
    into a new exchange takes the next step as the saved one does."""
    r = run(two_nodes(WORKERS / "hierarchy.py", tmp_path), timeout=240)
    assert r.returncode == 0, r.stderr
    got = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(4)]
    assert [(g["node"], g["local"]) for g in got] == [("a", [0, 2]), ("a", [1, 2]), ("b", [0, 2]), ("b", [1, 2])]
    for g in got:
        for name in ("dense", "powersgd", "greedylore-paper", "greedylore", "greedylore-s32", "topk"):
            row = g[name]
            assert row["agree"] and row["moved"] and row["resumed"] and all(row["loss_ok"]), (name, row)
            # greedylore's byte budget buys directions per share: its selections are a share's own
            assert name in ("greedylore", "greedylore-s32") or all(row["same"]), (name, row["same"])
            # a node sends one payload where flat it sends two (top-k: two shares' framing, on 1.3K values)
            bound = 0.55 if name != "topk" else 0.65
            assert all(net <= bound * 2 * flat for net, flat in zip(row["network"], row["flat_bytes"])), (name, row)
            assert all(n > 0 for n in row["node_bytes"]), name
        for name in ("dense", "powersgd"):
            assert g[name]["network"] == [b + 12 for b in g[name]["flat_bytes"]], name


@pytest.mark.parametrize("n", [1, 2, 4])
def test_dense_aggregate_is_the_mean_of_the_ranks_gradients(tmp_path, n):
    r = mpi(n, [WORKERS / "dense_aggregate.py", tmp_path])
    assert r.returncode == 0, r.stderr
    local = [np.load(tmp_path / f"local-{k}.npy") for k in range(n)]
    mean = np.mean(local, axis=0)
    if n > 1:
        assert not np.allclose(local[0], local[1]), "ranks must see different data"
    for k in range(n):
        np.testing.assert_allclose(np.load(tmp_path / f"aggregate-{k}.npy"), mean, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n,optimizer", [(2, "sgd"), (4, "adam")])
def test_parameters_identical_on_every_rank_after_training(tmp_path, n, optimizer):
    r = mpi(n, [WORKERS / "train_and_dump.py", tmp_path, "--steps", 15, "--optimizer", optimizer,
                "--lr", 0.01, "--run-dir", tmp_path / "run", "--eval-every", 0])
    assert r.returncode == 0, r.stderr
    params = [np.load(tmp_path / f"params-{k}.npy") for k in range(n)]
    for p in params[1:]:
        assert np.array_equal(p, params[0])


def test_n_ranks_follow_the_trajectory_of_one_process_with_n_times_the_batch(tmp_path):
    flags = ["--steps", 25, "--model", "cnn", "--optimizer", "sgd", "--lr", 0.05, "--eval-every", 0]
    (tmp_path / "four").mkdir()
    (tmp_path / "one").mkdir()
    r4 = mpi(4, [WORKERS / "train_and_dump.py", tmp_path / "four", *flags, "--batch-size", 8,
                 "--run-dir", tmp_path / "four"])
    r1 = mpi(1, [WORKERS / "train_and_dump.py", tmp_path / "one", *flags, "--batch-size", 32,
                 "--run-dir", tmp_path / "one"])
    assert r4.returncode == 0 and r1.returncode == 0, r4.stderr + r1.stderr
    p4, p1 = np.load(tmp_path / "four" / "params-0.npy"), np.load(tmp_path / "one" / "params-0.npy")
    start = np.load(tmp_path / "one" / "params-init.npy")
    assert np.array_equal(start, np.load(tmp_path / "four" / "params-init.npy"))
    assert np.abs(p4 - p1).max() < 1e-4
    assert np.abs(p1 - start).max() > 1e-2  # not vacuous: training moved the parameters far more


# By default the quantizers encode in backward only where a rank has a core torch leaves free
QUANTIZER_THREADS = ["--overlap-encoding", "on"]


@pytest.mark.parametrize("n,compressor,extra", [(2, "dense", []), (4, "dense", []), (2, "powersgd", []),
                                                (4, "greedylore", ["--sketch-bits", 32]), (2, "sparse-dither", []),
                                                (3, "sparse-dither", ["--quantizer-exchange", "sharded"])])
def test_overlapped_buckets_give_the_same_bits_and_bytes_as_one_exchange(tmp_path, n, compressor, extra):
    flags = ["--steps", 12, "--model", "cnn", "--optimizer", "adam", "--lr", 0.003, "--eval-every", 0,
             "--log-every", 1, "--compressor", compressor, "--start-compress-step", 2, *extra]
    quantizer = compressor == "sparse-dither"
    runs, sizes = {}, (0, 0.02)  # 0.02 MB: the cnn's matrices make several buckets
    for bucket_mb in sizes:
        (tmp_path / str(bucket_mb)).mkdir()
    r = runs_in_one_launch(n, WORKERS / "train_and_dump.py",
                           [[tmp_path / str(b), *flags, *(QUANTIZER_THREADS if quantizer else []), "--bucket-mb", b,
                             "--run-dir", tmp_path / str(b)] for b in sizes])
    assert r.returncode == 0, r.stderr
    for bucket_mb in sizes:
        folder = tmp_path / str(bucket_mb)
        lines = [json.loads(x) for x in open(folder / "metrics.jsonl") if '"train"' in x]
        runs[bucket_mb] = [np.load(folder / f"params-{k}.npy") for k in range(n)], [x["wire_bytes"] for x in lines]
        if quantizer:  # not vacuous: from its second step every matrix was encoded during backward
            assert [x["encoded_in_backward"] for x in lines] == [0] + [4 * bool(bucket_mb)] * 11
    for one, bucketed in zip(runs[0][0], runs[0.02][0]):
        assert np.array_equal(one, bucketed)
    assert runs[0][1] == runs[0.02][1]


def overlap_case(compressor):
    """compressor[:sketch bits] -> the worker run that counts what started in backward."""
    return 2, WORKERS / "overlap_started.py", compressor.split(":")


# greedylore's first round starts in backward with its fp32 sketch (:32); the 16-bit sketch, the
# default, agrees its scales first, so it never does
@pytest.mark.parametrize("compressor", ["dense", "powersgd", "greedylore:32", "greedylore:16", "qsgd"])
def test_buckets_start_while_backward_runs(request, tmp_path_factory, compressor):
    steps = json.loads((one_launch_per_world_size(request, tmp_path_factory, overlap_case) / "out.json").read_text())
    if compressor == "greedylore:16":
        assert len(steps) == 4 and all(step["started_in_backward"] == 0 for step in steps)
        return
    # a compressor other than dense knows what a step does once it has aggregated one (greedylore:
    # and built its basis, on step 0 here): their first steps run after backward
    later = compressor != "dense"
    for step in steps[2:] if later else steps:
        # every bucket was handed to MPI (the quantizer: to its encoder) from the hooks, before average()
        assert step["buckets"] >= 3 and step["started_in_backward"] == step["buckets"]
        if compressor == "qsgd":
            assert step["encodings"] == step["buckets"] and step["in_flight"] == 0  # it exchanges after backward
        else:
            assert step["in_flight"] >= (step["buckets"] if compressor == "dense" else 1)
    if later:
        assert steps[0]["started_in_backward"] == 0


@pytest.mark.parametrize("compressor", ["powersgd", "greedylore", "sparse-dither"])
def test_a_non_finite_gradient_in_an_overlapped_first_round_gives_the_bits_of_one_exchange(tmp_path, compressor):
    """Rank 1's gradient turns NaN in step 2, after its buckets left in backward: every rank skips
    the step, and parameters and residuals come out as with the exchange after backward."""
    from mpitrain import checkpoint
    quantizer = compressor == "sparse-dither"
    flags = ["--steps", 8, "--model", "user_models:nan_on_rank1_step3", "--compressor", compressor,
             "--start-compress-step", 0, "--eval-every", 0, "--log-every", 1, *(QUANTIZER_THREADS if quantizer else []),
             *(["--sketch-bits", 32] if compressor == "greedylore" else [])]  # the sketch that starts in backward
    runs = {}
    for bucket_mb in (0, 0.001):  # 0.001 MB: each of the two matrices its own bucket
        folder = tmp_path / str(bucket_mb)
        folder.mkdir()
        r = mpi(2, [WORKERS / "train_and_dump.py", folder, *flags, "--bucket-mb", bucket_mb, "--run-dir", folder])
        assert r.returncode == 0, r.stderr
        lines = [json.loads(x) for x in open(folder / "metrics.jsonl") if '"train"' in x]
        assert [x["skipped_steps"] for x in lines] == [0, 0, 1, 1, 1, 1, 1, 1]
        assert not checkpoint.verify(folder / "checkpoints" / "ckpt-000000008.h5")  # no NaN kept, residuals included
        runs[bucket_mb] = [np.load(folder / f"params-{k}.npy") for k in range(2)], [x["wire_bytes"] for x in lines]
        runs["encoded"] = [x.get("encoded_in_backward") for x in lines]
    for one, bucketed in zip(runs[0][0], runs[0.001][0]):
        assert np.array_equal(one, bucketed)
    if quantizer:  # not vacuous: rank 0 (the ranks alike) encoded in backward on every step after the first
        assert runs["encoded"] == [0] + [2] * 7
        return
    # not vacuous: the overlapped run sent its first round from backward, then again on the NaN step
    extra = [b - a for a, b in zip(runs[0][1], runs[0.001][1])]
    assert extra[2] > 0 and extra[:2] + extra[3:] == [0] * 7


def test_quantizers_encode_in_backward_by_default_only_where_torch_leaves_a_core_free(tmp_path):
    code = """
import json, sys, torch, mpitrain
from mpitrain import models
from mpitrain.data import Dataset, locate
world = mpitrain.init()
cores = world.cores_per_rank()
found = {}
for threads, setting in [(cores, "auto"), (max(1, cores - 1), "auto"), (cores, "on"), (1, "off")]:
    torch.set_num_threads(threads)
    model = models.build("cnn", Dataset(locate("digits")).info)
    exchange = mpitrain.Exchange(model, world, "qsgd", bucket_mb=0.02, overlap_encoding=setting)
    found[f"{threads}-{setting}"] = exchange.compressor.overlaps
json.dump({"cores": cores, "found": found}, open(sys.argv[1], "w"))
"""
    r = mpi(1, ["-c", code, tmp_path / "out.json"])
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    cores, found = out["cores"], out["found"]
    assert found[f"{cores}-auto"] is False and found[f"{cores}-on"] is True and found["1-off"] is False
    if cores > 1:  # a core left free: the encoder takes it
        assert found[f"{cores - 1}-auto"] is True


def test_a_rank_that_stops_in_the_two_level_exchange_is_named_by_the_watchdog(tmp_path):
    # rank 3 stops: its node's other rank waits in the node's collective, the network's ranks in theirs
    r = run(two_nodes(WORKERS / "hierarchy.py", tmp_path, "stall"), timeout=120)
    lines = [x for x in r.stderr.splitlines() if x.startswith("mpitrain: stalled")]
    assert r.returncode == STALLED and lines and "rank(s) 3 did not arrive" in lines[0], r.stderr
