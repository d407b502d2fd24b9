"""GreedyLore and PowerSGD under a real mpiexec: exactness, error feedback, contraction, bytes."""
import json

import numpy as np
import pytest
import torch

from helpers import WORKERS, mpi
from mpitrain.compress.lowrank import POWER_INIT, generator
from mpitrain.layout import CONTROL

C = 4 * len(CONTROL)  # the control words ride in every dense or payload Allreduce


def stream(tmp_path, n, name, steps, *flags):
    r = mpi(n, [WORKERS / "compress_stream.py", tmp_path, name, steps, *flags])
    assert r.returncode == 0, r.stderr
    ranks = [dict(np.load(tmp_path / f"rank-{k}.npz")) for k in range(n)]
    slots = json.loads(str(ranks[0]["shapes"]))
    return ranks, slots


def matrices(flat, slots, which):
    """Per-slot n x m views of a flat gradient-ordered array."""
    out = []
    for name, offset, numel, shape in (slots[i] for i in which):
        out.append(flat[offset:offset + numel].reshape(shape[0], -1).astype(np.float64))
    return out


def residuals(flat, slots, which):
    out, at = [], 0
    for i in which:
        shape = slots[i][3]
        n, m = shape[0], int(np.prod(shape[1:]))
        out.append(flat[at:at + n * m].reshape(n, m).astype(np.float64))
        at += n * m
    return out


def projectors(flat, dims):
    out, at = [], 0
    for a, b in dims:
        out.append(flat[at:at + a * b].reshape(a, b).astype(np.float64))
        at += a * b
    return out


def project(x, p, powersgd=False):
    """P P^T applied on the projected side: the left for wide matrices (and PowerSGD), else the right."""
    if powersgd or x.shape[0] <= x.shape[1]:
        return p @ (p.T @ x)
    return (x @ p) @ p.T


CASES = [(2, "greedylore", ["--select", "greedy"]), (4, "greedylore", ["--select", "greedy"]),
         (2, "greedylore", ["--select", "random"]), (2, "greedylore", ["--select", "lazy"]),
         (3, "powersgd", [])]


@pytest.mark.parametrize("n,name,extra", CASES)
def test_error_feedback_is_exact_and_the_sum_of_reconstructions_is_what_every_rank_gets(tmp_path, n, name, extra):
    ranks, slots = stream(tmp_path, n, "drift", 14, "--compressor", name, "--rank", 3, "--start-compress-step", 2,
                          "--refresh-every", 5, *extra)
    which = list(ranks[0]["compressed"])
    rank = 3
    assert len(which) >= 2 and 1 not in which  # the 6 x 30 matrix is below the eligibility threshold
    dims = [(slots[i][3][0], rank) if name == "powersgd" else (min(slots[i][3][0], int(np.prod(slots[i][3][1:]))), rank)
            for i in which]
    compressed_steps = 0
    for t in range(14):
        if t < 2 or ranks[0]["refresh"][t]:  # dense: the sum of the shares, residuals flushed into it
            total = [sum(parts) for parts in zip(*[matrices(rr["g"][t], slots, which) for rr in ranks])]
            if t >= 2:
                for rr in ranks:
                    total = [a + b for a, b in zip(total, residuals(rr["e_old"][t], slots, which))]
                if t > 2:  # a later refresh flushes a real residual
                    assert np.abs(sum(residuals(rr["e_old"][t], slots, which)[0] for rr in ranks)).max() > 0
            for rr in ranks:
                for got, want in zip(matrices(rr["result"][t], slots, which), total):
                    np.testing.assert_allclose(got, want, atol=2e-5)
                assert not rr["e_new"][t].any()
            continue
        compressed_steps += 1
        for r in ranks[1:]:
            assert np.array_equal(r["p"][t], ranks[0]["p"][t])  # one shared projector
        ps = projectors(ranks[0]["p"][t], dims)
        sent_sum = [0.0] * len(which)
        for r in ranks:
            g = matrices(r["g"][t], slots, which)
            e_old, e_new = residuals(r["e_old"][t], slots, which), residuals(r["e_new"][t], slots, which)
            for j, p in enumerate(ps):
                x = g[j] + e_old[j]
                sent = project(x, p, name == "powersgd")
                np.testing.assert_allclose(sent + e_new[j], x, atol=2e-5)  # sent + e_new == g + e_old
                sent_sum[j] = sent_sum[j] + sent
        for r in ranks:
            for j, got in enumerate(matrices(r["result"][t], slots, which)):
                np.testing.assert_allclose(got, sent_sum[j], atol=5e-5)
            dense = [i for i in range(len(slots)) if i not in which]
            for got, *parts in zip(matrices(r["result"][t], slots, dense),
                                   *[matrices(rr["g"][t], slots, dense) for rr in ranks]):
                np.testing.assert_allclose(got, sum(parts), atol=1e-5)
    assert compressed_steps >= 8


def test_bases_are_identical_on_every_rank_after_refreshes(tmp_path):
    ranks, _ = stream(tmp_path, 4, "noise", 12, "--compressor", "greedylore", "--start-compress-step", 1,
                      "--refresh-every", 4)
    assert ranks[0]["refresh"].sum() == 3
    assert np.abs(ranks[0]["shared_bases"]).sum() > 0
    for r in ranks[1:]:
        assert np.array_equal(r["shared_bases"], ranks[0]["shared_bases"])


def bounds(slots, which, r):
    return np.array([1 - min(r, s[3][0], int(np.prod(s[3][1:]))) / min(s[3][0], int(np.prod(s[3][1:])))
                     for s in (slots[i] for i in which)])


@pytest.mark.parametrize("name", ["drift", "noise"])
def test_exact_scores_contract_at_every_step(tmp_path, name):
    ranks, slots = stream(tmp_path, 2, name, 60, "--compressor", "greedylore", "--scores", "exact", "--rank", 2,
                          "--start-compress-step", 1, "--refresh-every", 25, "--contraction-every", 1)
    measured = ~ranks[0]["refresh"] & (np.arange(60) >= 1)  # step 0 is dense warm-up
    ratios = ranks[0]["ratios"][measured]
    assert ratios.shape[0] == 60 - 1 - 3 and not np.isnan(ratios).any()
    assert (ratios <= bounds(slots, ranks[0]["compressed"], 2) + 1e-6).all()


def test_probe_scores_contract_in_the_mean(tmp_path):
    ranks, slots = stream(tmp_path, 2, "geometric", 80, "--compressor", "greedylore", "--probes", 4, "--rank", 2,
                          "--start-compress-step", 1, "--refresh-every", 1000, "--contraction-every", 1)
    ratios = ranks[0]["ratios"][2:]
    assert (ratios.mean(0) <= bounds(slots, ranks[0]["compressed"], 2)).all()


def test_rank_one_counterexample_lazy_never_contracts_greedy_does(tmp_path):
    common = ["--compressor", "greedylore", "--rank", 1, "--min-compression-rate", 0, "--start-compress-step", 0,
              "--refresh-every", 1000, "--contraction-every", 1, "--probes", 1]
    lazy, _ = stream(tmp_path, 1, "rankone", 10, *common, "--select", "lazy")
    greedy, _ = stream(tmp_path, 1, "rankone", 10, *common, "--select", "greedy")
    assert lazy[0]["refresh"][0] and greedy[0]["refresh"][0]
    np.testing.assert_allclose(lazy[0]["ratios"][1:, 0], 1.0)  # C(e2 e2^T) = 0: nothing contracts
    np.testing.assert_allclose(np.linalg.norm(lazy[0]["e_new"][1:], axis=1), np.arange(1, 10), rtol=1e-6)
    np.testing.assert_allclose(greedy[0]["ratios"][1:, 0], 0.0, atol=1e-12)
    np.testing.assert_allclose(greedy[0]["e_new"][1:], 0.0, atol=1e-7)


def test_wire_bytes_are_exactly_the_payloads(tmp_path):
    k, r = 3, 4
    ranks, slots = stream(tmp_path, 2, "noise", 9, "--compressor", "greedylore", "--rank", r, "--probes", k,
                          "--start-compress-step", 2, "--refresh-every", 4)
    which = set(ranks[0]["compressed"])
    numel = sum(s[2] for s in slots)
    dense_numel = sum(s[2] for i, s in enumerate(slots) if i not in which)
    nm = [(s[3][0], int(np.prod(s[3][1:]))) for i, s in enumerate(slots) if i in which]
    compressed = 4 * sum(min(r, min(a, b)) * max(a, b) for a, b in nm) + 4 * k * sum(min(a, b) for a, b in nm) \
        + 4 * dense_numel + C
    expected = [4 * numel + C] * 2 + [4 * numel + C + 16] + [compressed] * 3 + [4 * numel + C + 16] + [compressed] * 2
    for rr in ranks:
        assert list(rr["wire"]) == expected

    ranks, slots = stream(tmp_path, 2, "noise", 4, "--compressor", "powersgd", "--rank", r, "--start-compress-step", 1)
    which = set(ranks[0]["compressed"])
    dense_numel = sum(s[2] for i, s in enumerate(slots) if i not in which)
    nm = [(s[3][0], int(np.prod(s[3][1:]))) for i, s in enumerate(slots) if i in which]
    assert list(ranks[0]["wire"][1:]) == [4 * sum((a + b) * r for a, b in nm) + 4 * dense_numel + C] * 3


@pytest.mark.parametrize("name", ["greedylore", "powersgd"])
def test_full_rank_compression_is_the_dense_sum(tmp_path, name):
    ranks, slots = stream(tmp_path, 2, "noise", 6, "--compressor", name, "--rank", 64, "--min-compression-rate", 0,
                          "--start-compress-step", 1, "--refresh-every", 100)
    assert len(ranks[0]["compressed"]) == 5  # every matrix, even 2 x 2 ones
    for t in range(6):
        np.testing.assert_allclose(ranks[0]["result"][t], ranks[0]["g"][t] + ranks[1]["g"][t], atol=2e-5)
        # the residuals cancel across ranks; with GreedyLore's complete basis each one is zero
        assert np.abs(ranks[0]["e_new"][t] + ranks[1]["e_new"][t]).max() < 2e-5
        if name == "greedylore":
            assert np.abs(ranks[0]["e_new"][t]).max() < 2e-5


def test_powersgd_matches_an_independent_computation(tmp_path):
    r, steps = 2, 5
    ranks, slots = stream(tmp_path, 2, "drift", steps, "--compressor", "powersgd", "--rank", r,
                          "--start-compress-step", 0, "--seed", 7)
    which = list(ranks[0]["compressed"])
    qs = [torch.randn((int(np.prod(slots[i][3][1:])), r), generator=generator(7, 0, i, POWER_INIT)).double().numpy()
          for i in which]
    es = [[np.zeros(1)] * len(which) for _ in ranks]
    for t in range(steps):
        xs = [[g + e for g, e in zip(matrices(rr["g"][t], slots, which), es[k])] for k, rr in enumerate(ranks)]
        for j in range(len(which)):
            p, _ = np.linalg.qr(sum(x[j] for x in xs) @ qs[j])
            q = sum(x[j].T @ p for x in xs)
            want = p @ q.T
            got = matrices(ranks[0]["result"][t], slots, which)[j]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            for k in range(len(ranks)):
                es[k][j] = xs[k][j] - p @ (p.T @ xs[k][j])
            qs[j] = q


def test_same_seed_runs_are_bitwise_identical(tmp_path):
    def train(folder, seed):
        (tmp_path / folder).mkdir()
        r = mpi(2, [WORKERS / "train_and_dump.py", tmp_path / folder, "--compressor", "greedylore", "--steps", 40,
                    "--start-compress-step", 5, "--refresh-every", 10, "--seed", seed, "--eval-every", 0,
                    "--run-dir", tmp_path / folder])
        assert r.returncode == 0, r.stderr
        return np.load(tmp_path / folder / "params-0.npy")
    a, b, c = train("a", 1), train("b", 1), train("c", 2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_full_rank_greedylore_trains_like_dense(tmp_path):
    def train(folder, *flags):
        (tmp_path / folder).mkdir()
        r = mpi(2, [WORKERS / "train_and_dump.py", tmp_path / folder, "--steps", 30, "--eval-every", 0,
                    "--run-dir", tmp_path / folder, *flags])
        assert r.returncode == 0, r.stderr
        return np.load(tmp_path / folder / "params-0.npy"), np.load(tmp_path / folder / "params-init.npy")
    dense, start = train("dense")
    full, _ = train("full", "--compressor", "greedylore", "--rank", 512, "--min-compression-rate", 0,
                    "--start-compress-step", 3, "--refresh-every", 7)
    assert np.abs(full - dense).max() < 1e-4
    assert np.abs(dense - start).max() > 1e-2
