"""GreedyLore and PowerSGD under a real mpiexec: exactness, error feedback, contraction, bytes."""
import json

import numpy as np
import pytest
import torch

from helpers import WORKERS, mpi, one_launch_per_world_size, runs_in_one_launch
from mpitrain.compress.streams import Purpose, torch_stream
from mpitrain.layout import CONTROL

C = 4 * len(CONTROL)  # the control words ride in every dense or payload Allreduce


def stream(tmp_path, n, name, steps, *flags):
    r = mpi(n, [WORKERS / "compress_stream.py", tmp_path, name, steps, *flags])
    assert r.returncode == 0, r.stderr
    return dumped(tmp_path, n)


def streams_together(tmp_path, n, *cases):
    """stream() for each (stream, steps, flags...) of cases, in one launch."""
    folders = [tmp_path / str(i) for i in range(len(cases))]
    for folder in folders:
        folder.mkdir()
    r = runs_in_one_launch(n, WORKERS / "compress_stream.py", [[folder, *case] for folder, case in zip(folders, cases)])
    assert r.returncode == 0, r.stderr
    return [dumped(folder, n) for folder in folders]


def dumped(folder, n):
    """What each of n ranks of compress_stream.py dumped into folder, and the matrices' slots."""
    ranks = [dict(np.load(folder / f"rank-{k}.npz")) for k in range(n)]
    return ranks, json.loads(str(ranks[0]["shapes"]))


def streams(request, tmp_path_factory, case_of):
    """stream() for one instance of a parametrized test, its sibling instances' streams run in the
    same launch. case_of(**params) -> (ranks, stream, steps, flags)."""
    def worker_case(**params):
        n, name, steps, flags = case_of(**params)
        return n, WORKERS / "compress_stream.py", [name, steps, *flags]
    n = case_of(**request.node.callspec.params)[0]
    return dumped(one_launch_per_world_size(request, tmp_path_factory, worker_case), n)


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


def step_stats(rank_record, t) -> dict:
    return json.loads(str(rank_record["stats"][t]))


CASES = [(2, "greedylore-paper", ["--select", "greedy"]), (4, "greedylore-paper", ["--select", "greedy"]),
         (2, "greedylore-paper", ["--select", "random"]), (2, "greedylore-paper", ["--select", "lazy"]),
         (3, "powersgd", []), (2, "greedylore", ["--factor-bits", 32]),
         (4, "greedylore", ["--allocation", "global", "--factor-bits", 32]),
         (2, "greedylore", ["--refresh-residual", "flush", "--factor-bits", 32]),
         (3, "greedylore", ["--refresh-residual", "drop", "--factor-bits", 32]),
         (2, "greedylore", ["--basis", "fixed", "--refresh-residual", "keep", "--factor-bits", 32])]


def error_feedback_case(n, name, extra):
    return n, "drift", 14, ["--compressor", name, "--rank", 3, "--start-compress-step", 2, "--refresh-every", 5, *extra]


@pytest.mark.parametrize("n,name,extra", CASES)
def test_error_feedback_is_exact_and_the_sum_of_reconstructions_is_what_every_rank_gets(request, tmp_path_factory,
                                                                                        n, name, extra):
    ranks, slots = streams(request, tmp_path_factory, error_feedback_case)
    which = list(ranks[0]["compressed"])
    policy = "flush" if name == "greedylore-paper" else extra[extra.index("--refresh-residual") + 1] \
        if "--refresh-residual" in extra else "keep"
    assert len(which) >= 2 and 1 not in which  # the 6 x 30 matrix is below the eligibility threshold
    compressed_steps, refreshes_with_residual = 0, 0
    for t in range(14):
        if t < 2 or ranks[0]["refresh"][t]:  # dense: the sum of the shares (+ the residuals if flushed)
            e_old = [residuals(rr["e_old"][t], slots, which) for rr in ranks]
            total = [sum(parts) for parts in zip(*[matrices(rr["g"][t], slots, which) for rr in ranks])]
            if policy == "flush":
                total = [a + sum(parts) for a, parts in zip(total, zip(*e_old))]
            refreshes_with_residual += np.abs(sum(e[0] for e in e_old)).max() > 0
            for rr in ranks:
                for got, want in zip(matrices(rr["result"][t], slots, which), total):
                    np.testing.assert_allclose(got, want, atol=2e-5)
                if policy == "keep":
                    assert np.array_equal(rr["e_new"][t], rr["e_old"][t])
                else:
                    assert not rr["e_new"][t].any()
            continue
        compressed_steps += 1
        for r in ranks[1:]:
            assert np.array_equal(r["p"][t], ranks[0]["p"][t])  # one shared projector
        sent_ranks = step_stats(ranks[0], t).get("ranks", [3] * len(which))
        dims = [(slots[i][3][0] if name == "powersgd" else min(slots[i][3][0], int(np.prod(slots[i][3][1:]))), r)
                for i, r in zip(which, sent_ranks)]
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
    assert name == "powersgd" or refreshes_with_residual >= 1  # a later refresh meets a real residual


@pytest.mark.parametrize("n", [2, 5])
def test_sixteen_bit_factors_are_exact_integer_sums_and_error_feedback_keeps_the_rounding(tmp_path, n):
    """Against an independent computation: Q_i = P^T x_i, one peak per row over all ranks, scale =
    peak / levels with levels = 32767 // n; each rank sends P round(Q_i / scale) scale, keeps the
    rest as its residual, and every rank gets the exact sum of what was sent."""
    ranks, slots = stream(tmp_path, n, "drift", 10, "--compressor", "greedylore", "--rank", 3,
                          "--start-compress-step", 2, "--refresh-every", 0)
    which = list(ranks[0]["compressed"])
    levels = 32767 // n
    dims = [min(slots[i][3][0], int(np.prod(slots[i][3][1:]))) for i in which]
    for t in range(2, 10):
        sent = step_stats(ranks[0], t)["ranks"]
        ps = projectors(ranks[0]["p"][t], list(zip(dims, sent)))
        xs = [[g + e for g, e in zip(matrices(rr["g"][t], slots, which), residuals(rr["e_old"][t], slots, which))]
              for rr in ranks]
        for j, p in enumerate(ps):
            wide = xs[0][j].shape[0] <= xs[0][j].shape[1]
            qs = [p.T @ (x[j] if wide else x[j].T) for x in xs]  # r x D per rank
            peak = np.max([np.abs(q).max(1) for q in qs], 0).astype(np.float32)
            scale = (peak / np.float32(levels)).astype(np.float64)[:, None]
            total = 0.0
            for k, rr in enumerate(ranks):
                # what this rank sent is x - e_new: P times integers on the shared scale, within +-levels
                mine = xs[k][j] - residuals(rr["e_new"][t], slots, which)[j]
                mine = mine if wide else mine.T
                units = (p.T @ mine) / np.where(scale > 0, scale, 1)
                assert np.abs(units - np.round(units)).max() < 0.02 and np.abs(units).max() <= levels + 0.02
                # and it is the rounding of P^T x: at most one step away (half, but for ties in fp32)
                assert np.abs(units - qs[k] / np.where(scale > 0, scale, 1)).max() <= 1.0
                total = total + mine
            for rr in ranks:  # every rank gets exactly the sum of what the ranks sent
                got = matrices(rr["result"][t], slots, which)[j]
                np.testing.assert_allclose(got if wide else got.T, total, atol=1e-4 * np.abs(total).max())


def test_bases_are_identical_on_every_rank_after_refreshes(tmp_path):
    ranks, _ = stream(tmp_path, 4, "noise", 12, "--compressor", "greedylore-paper", "--start-compress-step", 1,
                      "--refresh-every", 4)
    assert ranks[0]["refresh"].sum() == 3
    assert np.abs(ranks[0]["shared_bases"]).sum() > 0
    for r in ranks[1:]:
        assert np.array_equal(r["shared_bases"], ranks[0]["shared_bases"])


def test_a_rank_whose_basis_drifted_gets_rank_0s_back_before_it_projects(tmp_path):
    """One ulp of one value of rank 1's bases before step 3: the bases' check finds it after that
    step's rotation, rank 0's bases replace it, and every rank still gets the same result."""
    r = mpi(2, [WORKERS / "compress_stream.py", tmp_path, "drift", 6, "--compressor", "greedylore", "--rank", 3,
                "--start-compress-step", 1, "--refresh-every", 0], PERTURB_BASIS_AT="3")
    assert r.returncode == 0, r.stderr
    ranks = [dict(np.load(tmp_path / f"rank-{k}.npz")) for k in range(2)]
    assert [int(rr["basis_rebroadcasts"]) for rr in ranks] == [1, 1]
    assert np.array_equal(ranks[0]["shared_bases"], ranks[1]["shared_bases"])
    for t in range(6):
        assert np.array_equal(ranks[0]["result"][t], ranks[1]["result"][t]), t


def test_tracked_bases_stay_identical_and_orthonormal_and_follow_the_gradient(tmp_path):
    """60 tracking steps with no refresh after the first: every step rotates each basis."""
    ranks, slots = stream(tmp_path, 4, "drift", 61, "--compressor", "greedylore", "--rank", 3,
                          "--start-compress-step", 1, "--refresh-every", 0)
    assert ranks[0]["refresh"].sum() == 1  # built once, on the last dense warm-up step
    for r in ranks[1:]:
        assert np.array_equal(r["shared_bases"], ranks[0]["shared_bases"])
        assert np.array_equal(r["shared_warm"], ranks[0]["shared_warm"])
    which = list(ranks[0]["compressed"])
    dims = [min(slots[i][3][0], int(np.prod(slots[i][3][1:]))) for i in which]
    bases = projectors(ranks[0]["shared_bases"], [(d, d) for d in dims])
    for b in bases:  # fp32 Householder rotations keep a complete orthonormal basis
        assert np.abs(b.T @ b - np.eye(len(b))).max() < 1e-4
    # The drift stream's rank-3 signal turns 90 degrees every 40 steps, and the basis was built
    # once at step 0: over steps 30-60 what is sent must hold nearly what the best approximations
    # of the same ranks hold (the issue's `captured` against `captured_optimal`).
    captured = best_total = 0.0
    for t in range(30, 61):
        sent = step_stats(ranks[0], t)["ranks"]
        ps = projectors(ranks[0]["p"][t], list(zip(dims, sent)))
        xs = [sum(parts) for parts in zip(*[[g + e for g, e in zip(matrices(rr["g"][t], slots, which),
                                                                    residuals(rr["e_old"][t], slots, which))]
                                            for rr in ranks])]
        for x, p, r in zip(xs, ps, sent):
            if r == 0:
                continue
            x = x if x.shape[0] <= x.shape[1] else x.T
            best_total += (np.linalg.svd(x, compute_uv=False)[:r] ** 2).sum()
            captured += np.linalg.norm(p.T @ x) ** 2
    assert captured > 0.8 * best_total  # a basis left where it was at step 0 holds about r/d of it


def bounds(slots, which, r):
    return np.array([1 - min(r, s[3][0], int(np.prod(s[3][1:]))) / min(s[3][0], int(np.prod(s[3][1:])))
                     for s in (slots[i] for i in which)])


VARIANTS = {"paper": ["--compressor", "greedylore-paper"],
            "tracking": ["--compressor", "greedylore", "--allocation", "per-matrix"],
            "tracking-global": ["--compressor", "greedylore"]}


def contractions(ranks, slots, variant, r):
    """Per compressed step: (measured, bound) per matrix, or for global allocation the total."""
    steps = [t for t in range(len(ranks[0]["refresh"])) if "contraction" in step_stats(ranks[0], t)]
    stats = [step_stats(ranks[0], t) for t in steps]
    if variant == "tracking-global":
        return np.array([x["contraction"] for x in stats]), np.array([x["contraction_bound"] for x in stats])
    if variant == "paper":
        return ranks[0]["ratios"][steps], np.array([bounds(slots, ranks[0]["compressed"], r)] * len(steps))
    d = np.array([min(s[3][0], int(np.prod(s[3][1:]))) for s in (slots[i] for i in ranks[0]["compressed"])])
    return ranks[0]["ratios"][steps], np.array([1 - np.array(x["ranks"]) / d for x in stats])


def exact_scores_case(name, variant):
    return 2, name, 60, [*VARIANTS[variant], "--scores", "exact", "--rank", 2, "--start-compress-step", 1,
                         "--refresh-every", 25, "--contraction-every", 1]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", ["drift", "noise"])
def test_exact_scores_contract_at_every_step(request, tmp_path_factory, name, variant):
    ranks, slots = streams(request, tmp_path_factory, exact_scores_case)
    measured, bound = contractions(ranks, slots, variant, 2)
    assert len(measured) == 60 - 1 - ranks[0]["refresh"][1:].sum() and not np.isnan(measured).any()
    assert (measured <= bound + 1e-6).all()
    assert (bound < 1).all()


def probe_scores_case(variant):
    return 2, "geometric", 80, [*VARIANTS[variant], "--probes", 4, "--rank", 2, "--start-compress-step", 1,
                                "--refresh-every", 1000, "--contraction-every", 1]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_probe_scores_contract_in_the_mean(request, tmp_path_factory, variant):
    ranks, slots = streams(request, tmp_path_factory, probe_scores_case)
    measured, bound = contractions(ranks, slots, variant, 2)
    assert len(measured) >= 78
    assert (measured.mean(0) <= bound.mean(0)).all()


def test_rank_one_counterexample_lazy_never_contracts_greedy_does(tmp_path):
    common = ["--rank", 1, "--min-compression-rate", 0, "--start-compress-step", 0,
              "--refresh-every", 1000, "--contraction-every", 1, "--probes", 1]
    allocations = ("per-matrix", "global")
    (lazy, _), (greedy, _), *tracked_runs = streams_together(
        tmp_path, 1, *[("rankone", 10, "--compressor", "greedylore-paper", *common, "--select", select)
                       for select in ("lazy", "greedy")],
        *[("rankone", 10, "--compressor", "greedylore", "--allocation", allocation, "--scores", "exact", *common)
          for allocation in allocations])
    assert lazy[0]["refresh"][0] and greedy[0]["refresh"][0]
    np.testing.assert_allclose(lazy[0]["ratios"][1:, 0], 1.0)  # C(e2 e2^T) = 0: nothing contracts
    np.testing.assert_allclose(np.linalg.norm(lazy[0]["e_new"][1:], axis=1), np.arange(1, 10), rtol=1e-6)
    np.testing.assert_allclose(greedy[0]["ratios"][1:, 0], 0.0, atol=1e-12)
    np.testing.assert_allclose(greedy[0]["e_new"][1:], 0.0, atol=1e-7)
    for tracked, _ in tracked_runs:
        assert tracked[0]["refresh"][0]
        # the warm start W = e1 sees nothing of e2 e2^T; the complete basis still holds >= 1/2 of it,
        # and the next power step finds e2: the residual never grows
        assert (tracked[0]["ratios"][1:, 0] <= 0.5 + 1e-6).all()
        np.testing.assert_allclose(tracked[0]["ratios"][3:, 0], 0.0, atol=1e-10)
        assert np.linalg.norm(tracked[0]["e_new"][1:], axis=1).max() <= 1.0 + 1e-6


def test_wire_bytes_are_exactly_the_payloads(tmp_path):
    k, r = 3, 4
    ranks, slots = stream(tmp_path, 2, "noise", 9, "--compressor", "greedylore-paper", "--rank", r, "--probes", k,
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


def test_tracking_sends_the_sketch_then_the_chosen_directions_within_powersgds_bytes(tmp_path):
    """Per compressed step: the sketch x [W | probes] (d x (t + k), t = last step's directions),
    the CRC check of the rotated bases (16 bytes), then Q (r_i x D) with the dense tensors. Under
    global allocation the ranks move to where the energy is, within PowerSGD's bytes at the same
    --rank (+ the CRC)."""
    k, r = 2, 3
    flags = ["--rank", r, "--start-compress-step", 2, "--min-compression-rate", 1]
    (ranks, slots), (powersgd, _) = streams_together(
        tmp_path, 2, ("geometric", 12, "--compressor", "greedylore", "--probes", k, "--allocation", "global",
                      "--factor-bits", 32, "--sketch-bits", 32, *flags),
        ("geometric", 12, "--compressor", "powersgd", *flags))
    which = set(ranks[0]["compressed"])
    numel = sum(s[2] for s in slots)
    dense_numel = sum(s[2] for i, s in enumerate(slots) if i not in which)
    nm = [(s[3][0], int(np.prod(s[3][1:]))) for i, s in enumerate(slots) if i in which]
    d, D = [min(a, b) for a, b in nm], [max(a, b) for a, b in nm]
    budget = max(sum(a + b for a, b in nm), sum(r * (a + b) - min(a, b) * k for a, b in nm))
    assert set(powersgd[0]["compressed"]) == which
    last = step_stats(ranks[0], 1)["ranks"]  # the refresh on the last warm-up step starts W at these
    assert sum(x * 4 * (a + b) for x, a, b in zip(last, d, D)) <= 4 * budget
    moved = False
    for t in range(12):
        wire = int(ranks[0]["wire"][t])
        if t < 2:
            assert wire == 4 * numel + C + (16 if t == 1 else 0)  # step 1 builds the bases: CRC
            continue
        sent = step_stats(ranks[0], t)["ranks"]
        assert sum(x * (a + b) for x, a, b in zip(sent, d, D)) <= budget
        want = 4 * sum(a * (x + k) for a, x in zip(d, last)) + 16 \
            + 4 * sum(x * b for x, b in zip(sent, D)) + 4 * dense_numel + C
        assert wire == want
        moved |= sent != [r] * len(nm)
        last = sent
    assert moved  # the geometric stream's energies differ by matrix: the ranks followed them
    # a direction's sketch column is paid the step after it is chosen, so a single step may go over
    # when ranks grow; over the run the bytes stay within powersgd's (+ the CRCs)
    assert ranks[0]["wire"][2:].sum() <= powersgd[0]["wire"][2:].sum() + 16 * 10
    for rr in ranks[1:]:
        assert list(rr["wire"]) == list(ranks[0]["wire"])


def test_sixteen_bit_steps_send_half_the_factor_bytes(tmp_path):
    """fp32 round: sketch + dense tensors + control words; CRC (16 bytes); the rows' peaks (fp32,
    max); then Q as int16."""
    k, r = 2, 3
    ranks, slots = stream(tmp_path, 3, "geometric", 6, "--compressor", "greedylore", "--probes", k, "--rank", r,
                          "--start-compress-step", 2, "--sketch-bits", 32)
    which = set(ranks[0]["compressed"])
    dense_numel = sum(s[2] for i, s in enumerate(slots) if i not in which)
    nm = [(s[3][0], int(np.prod(s[3][1:]))) for i, s in enumerate(slots) if i in which]
    directions = step_stats(ranks[0], 2)["ranks"]  # what fits in powersgd's bytes at rank r, per matrix
    assert all(step_stats(ranks[0], t)["ranks"] == directions for t in range(2, 6))
    want = 4 * (sum(min(a, b) * (x + k) for x, (a, b) in zip(directions, nm)) + dense_numel) + C + 16 \
        + 4 * sum(directions) + 2 * sum(x * max(a, b) for x, (a, b) in zip(directions, nm))
    assert want <= 4 * (sum(r * (a + b) for a, b in nm) + dense_numel) + C + 16 + 4 * sum(directions)
    for rr in ranks:
        assert list(rr["wire"][2:]) == [want] * 4


def test_a_sixteen_bit_sketch_buys_more_directions_within_powersgds_bytes_and_every_rank_decodes_alike(tmp_path):
    """--sketch-bits 16, per compressed step: the peaks (fp32, max) of every sketch column and of
    every uncompressed tensor and the control words; the sketch as int16, those tensors as int16
    pairs; the CRC; the rows' peaks; Q as int16. A direction then costs (2D + 4) + (2d + 4) bytes
    rather than (2D + 4) + 4d, so powersgd's bytes at --rank buy more of them."""
    k, r, n = 2, 3, 3
    flags = ["--compressor", "greedylore", "--probes", k, "--rank", r, "--start-compress-step", 2]
    (wide, _), (ranks, slots) = streams_together(tmp_path, n, ("geometric", 8, *flags, "--sketch-bits", 32),
                                                 ("geometric", 8, *flags))  # the default
    which = list(ranks[0]["compressed"])
    dense = [i for i in range(len(slots)) if i not in which]
    dense_numel = sum(slots[i][2] for i in dense)
    nm = [(s[3][0], int(np.prod(s[3][1:]))) for i, s in enumerate(slots) if i in which]
    d, D = [min(a, b) for a, b in nm], [max(a, b) for a, b in nm]
    budget = sum(4 * r * (a + b) - k * (2 * c + 4) for (a, b), c in zip(nm, d)) - 16 - 4 * (len(dense) + 1)
    last = step_stats(ranks[0], 1)["ranks"]
    for t in range(2, 8):
        sent = step_stats(ranks[0], t)["ranks"]
        assert sum(x * (2 * b + 4 + 2 * a + 4) for x, a, b in zip(sent, d, D)) <= budget
        assert sum(sent) > sum(step_stats(wide[0], t)["ranks"])  # fp32 sketch columns bought fewer
        want = 4 * (sum(x + k for x in last) + len(dense) + 1) + 2 * sum(a * (x + k) for a, x in zip(d, last)) \
            + 4 * dense_numel + C + 16 + 4 * sum(sent) + 2 * sum(x * b for x, b in zip(sent, D))
        assert int(ranks[0]["wire"][t]) == want, t
        last = sent
        for rr in ranks[1:]:  # the integer sums are exact: every rank decodes the same bits
            assert np.array_equal(rr["result"][t], ranks[0]["result"][t])
        # the uncompressed tensors, as fixed-point pairs, sum to fp32's accuracy: n ranks' pair
        # rounding (peak / 4L^2 each) and the decode's two fp32 roundings of up to n peaks
        levels = 32767 // n
        for i in dense:
            _, offset, numel, _ = slots[i]
            parts = [rr["g"][t][offset:offset + numel].astype(np.float64) for rr in ranks]
            peak = max(np.abs(p).max() for p in parts)
            bound = (n / (4 * levels ** 2) + 4 * n * 2.0 ** -24) * peak
            assert np.abs(ranks[0]["result"][t][offset:offset + numel] - sum(parts)).max() <= bound, slots[i][0]
    for rr in ranks[1:]:
        assert np.array_equal(rr["shared_bases"], ranks[0]["shared_bases"])
        assert list(rr["wire"]) == list(ranks[0]["wire"])


def full_rank_case(name):
    return 2, "noise", 6, ["--compressor", name, "--rank", 64, "--min-compression-rate", 0, "--start-compress-step", 1,
                           "--refresh-every", 100, *(["--factor-bits", 32] if name == "greedylore" else [])]


@pytest.mark.parametrize("name", ["greedylore", "powersgd"])
def test_full_rank_compression_is_the_dense_sum(request, tmp_path_factory, name):
    ranks, slots = streams(request, tmp_path_factory, full_rank_case)
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
    starts = [torch_stream(7, 0, i, Purpose.POWER_INIT) for i in which]
    qs = [torch.randn((int(np.prod(slots[i][3][1:])), r), generator=g).double().numpy() for i, g in zip(which, starts)]
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
    full_rank = ["--compressor", "greedylore", "--rank", 512, "--min-compression-rate", 0, "--start-compress-step", 3,
                 "--refresh-every", 7, "--factor-bits", 32]
    for folder in ("dense", "full"):
        (tmp_path / folder).mkdir()
    r = runs_in_one_launch(2, WORKERS / "train_and_dump.py", [[tmp_path / "dense", "--steps", 30, "--eval-every", 0],
                                                             [tmp_path / "full", "--steps", 30, "--eval-every", 0, *full_rank]])
    assert r.returncode == 0, r.stderr
    dense, full = (np.load(tmp_path / folder / "params-0.npy") for folder in ("dense", "full"))
    start = np.load(tmp_path / "dense" / "params-init.npy")
    assert np.abs(full - dense).max() < 1e-4
    assert np.abs(dense - start).max() > 1e-2


def _gamma_bound(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """|fl(a @ b) - a @ b| <= gamma_K |a| @ |b| elementwise for any order of the K-term sums
    (gamma_K = K u / (1 - K u), u = 2^-24); doubled to cover the parts' final additions."""
    k, u = a.shape[1], 2.0 ** -24
    return 2 * (k * u / (1 - k * u)) * (a.abs().double() @ b.abs().double()).numpy()


@pytest.mark.parametrize("threads", [1, 2])
def test_skinny_products_in_every_layout_are_the_product(threads):
    """Every route `Products.product` takes (X @ S with S either way round, X^T @ S, S @ X, S @ X^T,
    outputs that are transposed views) gives a @ b within the rounding bound of an fp32 product."""
    from mpitrain.compress.lowrank import Products
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(301, 130, generator=g)  # odd sizes: the loops' 4-row blocks have a tail
        s_cols, s_rows = torch.randn(130, 5, generator=g), torch.randn(5, 301, generator=g)
        mm = Products()
        s_col_major = torch.randn(5, 130, generator=g).t()
        cases = [(x, s_cols), (x, s_col_major), (x.t(), s_rows.t()), (s_rows, x), (s_cols.t(), x.t())]
        for a, b in cases:
            ref = a.double() @ b.double()
            for out in (torch.empty(a.shape[0], b.shape[1]), torch.empty(b.shape[1], a.shape[0]).t()):
                out.fill_(float("nan"))
                mm.product(a, b, out)
                assert (np.abs(out.double().numpy() - ref.numpy()) <= _gamma_bound(a, b)).all()
        # `plus` is added into a first: where a is X^T, a block of rows at a time inside the loop
        # (301 rows: several blocks and a tail); the same bits as adding first, then multiplying
        for k, (a, b) in enumerate(cases):
            base = torch.randn(a.t().shape, generator=g).t() if a.t().is_contiguous() else torch.randn(a.shape, generator=g)
            e = torch.randn(base.shape, generator=g) if base.is_contiguous() else torch.randn(base.t().shape, generator=g).t()
            fused, first = base.clone(memory_format=torch.preserve_format), base.clone(memory_format=torch.preserve_format)
            out_fused, out_first = torch.empty(a.shape[0], b.shape[1]), torch.empty(a.shape[0], b.shape[1])
            mm.product(fused, b, out_fused, e)
            first.add_(e)
            mm.product(first, b, out_first)
            assert torch.equal(fused, base + e) and torch.equal(out_fused, out_first), k
    finally:
        torch.set_num_threads(before)


def test_x_times_skinny_is_the_same_bits_at_any_thread_count():
    """X @ S splits X's rows among threads; a row's result must not depend on where the splits fall
    (rows are grouped by four from row 0, whatever the split). (S @ X sums the threads' parts: its
    bits may depend on their number.)"""
    from mpitrain.compress.lowrank import Products
    g = torch.Generator().manual_seed(3)
    x0, e = torch.randn(301, 130, generator=g), torch.randn(301, 130, generator=g)
    s_cols, s_rows = torch.randn(130, 9, generator=g), torch.randn(9, 130, generator=g)
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            x, added, plain = x0.clone(), torch.empty(301, 9), torch.empty(301, 9)
            Products().products([(x, s_cols, added, e), (x0, s_rows.t(), plain, None)])
            results.append((x, added, plain))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], x0 + e)
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


@pytest.mark.parametrize("kernels", ["compiled", "torch"])
def test_gram_schmidt_is_orthonormal_to_working_accuracy_and_keeps_a_zero_column_finite(kernels):
    """PowerSGD's P: classical Gram-Schmidt applied twice keeps orthogonality to a small multiple
    of the unit roundoff even for a nearly dependent column (condition ~1e3, where one pass loses
    it to ~cond^2 u); bound: r sqrt(n) u, the rounding of an n-term fp32 update per column pair.
    The first column is only scaled; an all-zero column stays zero and finite. Both paths."""
    from mpitrain.compress.lowrank import Products, TorchProducts
    mm = Products() if kernels == "compiled" else TorchProducts()
    g, u = np.random.default_rng(0), 2.0 ** -24
    for n, r in [(768, 4), (3000, 6), (32000, 8)]:
        p = g.standard_normal((n, r)).astype(np.float32)
        p[:, 2] = p[:, 1] + 1e-3 * p[:, 2]
        p[:, r - 1] = 0.0
        q = p.copy()
        mm.orthogonalize(torch.from_numpy(q), 1e-8)
        full = q[:, :r - 1].astype(np.float64)
        assert np.abs(full.T @ full - np.eye(r - 1)).max() <= r * np.sqrt(n) * u
        assert np.abs(q[:, 0] - p[:, 0] / np.linalg.norm(p[:, 0].astype(np.float64))).max() <= 2 * u
        assert np.array_equal(q[:, r - 1], np.zeros(n, dtype=np.float32))


def test_residual_pass_is_the_formula_and_the_same_bits_at_any_thread_count():
    from mpitrain.compress.lowrank import Products
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(257, 96, generator=g)
    sent = (torch.randn(257, 3, generator=g), torch.randn(3, 96, generator=g).t().contiguous().t())
    summed = (torch.randn(257, 4, generator=g), torch.randn(4, 96, generator=g))
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            x, e = x0.clone(), torch.full_like(x0, float("nan"))
            Products().residuals_and_sums([(x, e, sent, summed)])
            results.append((x, e))
            kept = x0.clone()
            Products().residuals_and_sums([(kept, None, None, summed)])  # no residual kept: the sum alone
            assert torch.equal(kept, x)
    finally:
        torch.set_num_threads(before)
    for x, e in results[1:]:
        assert torch.equal(x, results[0][0]) and torch.equal(e, results[0][1])
    x, e = results[0]
    assert (np.abs(x.double().numpy() - (summed[0].double() @ summed[1].double()).numpy())
            <= _gamma_bound(*summed)).all()
    # e = x0 - L R: a sum of K + 1 terms (x0 and K products) in some order: gamma_{K+2} (|x0| + |L| |R|)
    exact = x0.double() - sent[0].double() @ sent[1].double()
    k, u = sent[0].shape[1] + 2, 2.0 ** -24
    bound = 2 * k * u / (1 - k * u) * (x0.abs().double() + sent[0].abs().double() @ sent[1].abs().double()).numpy()
    assert (np.abs(e.double().numpy() - exact.numpy()) <= bound).all()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_jobs_run_in_one_dispatch_give_the_bits_of_one_job_at_a_time(threads):
    """`products` and `residuals_and_sums` hand every job's rows to the threads at once; each job
    must get exactly what it gets alone (ranges of one job never spill into another's)."""
    from mpitrain.compress.lowrank import Products
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(2)
        shapes = [(301, 130, 5), (97, 210, 3), (64, 64, 7), (513, 33, 4)]
        xs = [torch.randn(n, m, generator=g) for n, m, _ in shapes]
        es = [torch.randn(n, m, generator=g) for n, m, _ in shapes]
        left, right = [torch.randn(n, r, generator=g) for n, _, r in shapes], [torch.randn(m, r, generator=g) for _, m, r in shapes]
        alone, together = Products(), Products()

        def jobs():  # X^T @ S with e added into X (compiled loop), X @ S (MKL), S^T @ X (compiled loop)
            xs_ = [x.clone() for x in xs * 3]
            return xs_, ([(x.t(), s, torch.empty(x.shape[1], s.shape[1]), e.t()) for x, s, e in zip(xs_, left, es)]
                         + [(x, s, torch.empty(x.shape[0], s.shape[1]), None) for x, s in zip(xs_[4:], right)]
                         + [(s.t(), x, torch.empty(s.shape[1], x.shape[1]), None) for x, s in zip(xs_[8:], left)])
        (x1, one), (x2, many) = jobs(), jobs()
        for job in one:
            alone.product(*job)
        together.products(many)
        assert all(torch.equal(a[2], b[2]) for a, b in zip(one, many))
        assert all(torch.equal(a, b) for a, b in zip(x1, x2)) and not torch.equal(x1[0], xs[0])  # e was added
        x1, x2 = x1[:4], x2[:4]
        sums = [(torch.randn(n, r, generator=g), torch.randn(r, m, generator=g)) for n, m, r in shapes]
        sent = [(torch.randn(n, 2, generator=g), torch.randn(2, m, generator=g)) for n, m, _ in shapes]
        e1, e2 = [torch.empty_like(x) for x in xs], [torch.empty_like(x) for x in xs]
        for x, e, a, b in zip(x1, e1, sent, sums):
            alone.residuals_and_sums([(x, e, a, b)])
        together.residuals_and_sums(list(zip(x2, e2, sent, sums)))
        assert all(torch.equal(a, b) for a, b in zip(x1 + e1, x2 + e2))
    finally:
        torch.set_num_threads(before)


def _checksum(basis: np.ndarray, first: int) -> int:
    """The bases' checksum written out with Python integers: sum over rows i of (mix(first + i) | 1)
    * sum over columns j of bits[i, j] * (mix(j) | 1), mod 2^64 (mix: SplitMix64's finaliser)."""
    mask = 2**64 - 1

    def mix(x):
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)
    weights = [mix(j) | 1 for j in range(basis.shape[1])]
    bits = basis.view(np.uint32).tolist()
    return sum((mix(first + i) | 1) * sum(b * w for b, w in zip(row, weights)) for i, row in enumerate(bits)) & mask


def test_basis_pass_rotates_multiplies_and_checks_in_one_pass_the_same_at_any_thread_count():
    """`rotate_and_check`: basis - basis vt^T tri vt with its first t columns set to u, yt @ that
    basis within the rounding bound, a checksum equal to the one written out independently; the
    same bits at 1, 2 and 3 threads; and any one value moved by one ulp changes the checksum."""
    from mpitrain.compress.lowrank import Products
    g = torch.Generator().manual_seed(3)
    d, t = 301, 3  # not a multiple of the 128-row blocks nor of the four-row groups
    b0 = torch.linalg.qr(torch.randn(d, d, generator=g)).Q.contiguous()
    tri, vt = torch.randn(t, t, generator=g), torch.randn(t, d, generator=g)
    u, yt = torch.linalg.qr(torch.randn(d, t, generator=g)).Q, torch.randn(7, d, generator=g)
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            b = b0.clone()
            (product,), check = Products().rotate_and_check([(b, tri, vt, u, yt, 1000)])
            results.append((b, product, check))
    finally:
        torch.set_num_threads(before)
    for b, product, check in results[1:]:
        assert torch.equal(b, results[0][0]) and torch.equal(product, results[0][1]) and check == results[0][2]
    b, product, check = results[0]
    b64, tri64, vt64 = b0.double(), tri.double(), vt.double()
    exact = b64 - b64 @ vt64.t() @ tri64 @ vt64
    exact[:, :t] = u.double()
    k, ulp = d + 2 * t + 2, 2.0 ** -24  # each value: a d-term, a t-term and a t-term sum, then the subtraction
    bound = 2 * k * ulp / (1 - k * ulp) * (b64.abs() + b64.abs() @ vt64.abs().t() @ tri64.abs() @ vt64.abs())
    assert (np.abs((b.double() - exact).numpy()) <= bound.numpy()).all()
    assert (np.abs(product.numpy() - (yt.double() @ b.double()).numpy()) <= _gamma_bound(yt, b)).all()
    assert check == _checksum(b.numpy(), 1000)
    nothing = b[:, :0]
    for row, col in [(0, 0), (d - 1, d - 1), (150, 7), (299, 300)]:
        moved = b.clone()
        moved.numpy()[row, col] = np.nextafter(moved.numpy()[row, col], np.float32(np.inf))
        assert not torch.equal(moved, b)
        _, other = Products().rotate_and_check([(moved, nothing, nothing.t(), nothing, b[:0], 1000)])
        assert other != check, (row, col)
    _, same = Products().rotate_and_check([(b.clone(), nothing, nothing.t(), nothing, b[:0], 1000)])
    assert same == check  # not rotated: the bits alone decide it


@pytest.mark.parametrize("d,t", [(40, 1), (129, 5), (300, 12)])
def test_reflectors_from_geqrf_are_its_householder_product_in_compact_form(d, t):
    """`reflectors` (compiled, and in torch operations): V unit lower triangular with geqrf's
    tails, and I - V T V^T equal to the product of the reflectors, whose first t columns are LAPACK's
    own Q (torch.linalg.householder_product), within float32 rounding of a d-term sum; orthogonal."""
    from mpitrain.compress.lowrank import Products, TorchProducts
    a, tau = torch.geqrf(torch.randn(d, t, generator=torch.Generator().manual_seed(d)))
    q = torch.linalg.householder_product(a, tau).double()
    for mm in (Products(), TorchProducts()):
        tri, vt = mm.reflectors(a.clone(), tau)
        v = vt.t().double()
        assert torch.equal(v.triu(), torch.eye(d, t, dtype=torch.float64)) and torch.equal(v.tril(-1), a.tril(-1).double())
        assert torch.equal(tri.tril(-1), torch.zeros(t, t)) and torch.equal(tri.diagonal(), tau)
        h = torch.eye(d, dtype=torch.float64) - v @ tri.double() @ v.t()
        bound = 4 * (d + t) * 2.0 ** -24  # |v|, |T| and Q's columns are O(1): a few d-term sums each
        assert (h[:, :t] - q).abs().max() <= bound, type(mm).__name__
        assert (h.t() @ h - torch.eye(d, dtype=torch.float64)).abs().max() <= bound


def test_torch_operations_meet_the_compiled_loops_bounds_and_checksum():
    """--kernels torch: the products in each layout, the residual pass and the basis pass within the
    rounding bounds the compiled loops meet; the bases' checksum equal to the one written out
    independently (so a torch rank and a compiled one would agree on the same bits), and changed
    by any one value moved by one ulp."""
    from mpitrain.compress.lowrank import TorchProducts
    mm, g = TorchProducts(), torch.Generator().manual_seed(5)
    x, s = torch.randn(193, 70, generator=g), torch.randn(70, 5, generator=g)
    plus = torch.randn(193, 70, generator=g)
    for a, b in [(x, s), (s.t(), x.t()), (x.t(), torch.randn(193, 3, generator=g))]:
        out = torch.empty(a.shape[0], b.shape[1])
        mm.product(a, b, out)
        assert (np.abs(out.double().numpy() - (a.double() @ b.double()).numpy()) <= _gamma_bound(a, b)).all()
    added, out = x.clone(), torch.empty(193, 5)
    mm.product(added, s, out, plus)
    assert torch.equal(added, x + plus) and (np.abs(out.double().numpy() - (added.double() @ s.double()).numpy())
                                             <= _gamma_bound(added, s)).all()
    sent = (torch.randn(193, 3, generator=g), torch.randn(3, 70, generator=g))
    summed = (torch.randn(193, 4, generator=g), torch.randn(4, 70, generator=g))
    got, e = x.clone(), torch.empty_like(x)
    mm.residuals_and_sums([(got, e, sent, summed)])
    assert (np.abs(got.double().numpy() - (summed[0].double() @ summed[1].double()).numpy())
            <= _gamma_bound(*summed)).all()
    k, u = sent[0].shape[1] + 2, 2.0 ** -24
    bound = 2 * k * u / (1 - k * u) * (x.abs().double() + sent[0].abs().double() @ sent[1].abs().double()).numpy()
    assert (np.abs(e.double().numpy() - (x.double() - sent[0].double() @ sent[1].double()).numpy()) <= bound).all()
    d, t = 301, 3
    b0 = torch.linalg.qr(torch.randn(d, d, generator=g)).Q.contiguous()
    tri, vt = torch.randn(t, t, generator=g), torch.randn(t, d, generator=g)
    u_, yt = torch.linalg.qr(torch.randn(d, t, generator=g)).Q, torch.randn(7, d, generator=g)
    b = b0.clone()
    (product,), check = mm.rotate_and_check([(b, tri, vt, u_, yt, 1000)])
    b64, tri64, vt64 = b0.double(), tri.double(), vt.double()
    exact = b64 - b64 @ vt64.t() @ tri64 @ vt64
    exact[:, :t] = u_.double()
    k = d + 2 * t + 2
    bound = 2 * k * u / (1 - k * u) * (b64.abs() + b64.abs() @ vt64.abs().t() @ tri64.abs() @ vt64.abs())
    assert (np.abs((b.double() - exact).numpy()) <= bound.numpy()).all()
    assert (np.abs(product.numpy() - (yt.double() @ b.double()).numpy()) <= _gamma_bound(yt, b)).all()
    assert check == _checksum(b.numpy(), 1000)
    nothing = b[:, :0]
    for row, col in [(0, 0), (d - 1, d - 1), (150, 7)]:
        moved = b.clone()
        moved.numpy()[row, col] = np.nextafter(moved.numpy()[row, col], np.float32(np.inf))
        assert mm.rotate_and_check([(moved, nothing, nothing.t(), nothing, b[:0], 1000)])[1] != check


KERNEL_CASES = [(2, ["--compressor", "powersgd"]),
                (3, ["--compressor", "greedylore-paper", "--refresh-every", "5"]),
                (3, ["--compressor", "greedylore"]),  # tracking basis, 16-bit sketch and factors
                (2, ["--compressor", "greedylore", "--sketch-bits", "32"]),
                (2, ["--compressor", "greedylore", "--factor-bits", "32"]),
                (2, ["--compressor", "greedylore", "--allocation", "global"]),
                (2, ["--compressor", "greedylore", "--basis", "fixed", "--refresh-every", "4"])]


def kernels_case(n, flags):
    return n, WORKERS / "kernels_agree.py", [14, "--rank", 3, "--start-compress-step", 2, *flags]


@pytest.mark.parametrize("n,flags", KERNEL_CASES)
def test_the_torch_path_chooses_as_the_compiled_one_within_rounding_and_the_same_bits_on_every_rank(
        request, tmp_path_factory, n, flags):
    """Every step the torch compressor starts from the compiled one's state and aggregates the same
    gradients (tests/workers/kernels_agree.py): the same directions chosen (projectors within a tenth
    of what tells one basis column from another), each result within the bound the two paths'
    rounding and their projectors' gap allow (16-bit: plus one level of each rank's rounding), the
    uncompressed tensors bitwise equal, and the torch path's results the same bits on every rank,
    its bases never rebroadcast."""
    folder = one_launch_per_world_size(request, tmp_path_factory, kernels_case)
    ranks = [dict(np.load(folder / f"rank-{k}.npz")) for k in range(n)]
    first = ranks[0]
    assert first["dense_equal"].all() and first["ranks_equal"].all()
    assert first["projector_gap"].max() < 1.0 and first["result_ratio"].max() <= 1.0
    assert (first["result_ratio"] > 0).sum() >= 8  # the compressed steps were compared, and differ in rounding
    for other in ranks[1:]:
        assert np.array_equal(other["torch_result"], first["torch_result"])
    assert all(int(rank["rebroadcasts"]) == 0 for rank in ranks)


def test_shared_streams_are_keyed_by_seed_step_slot_and_purpose():
    def draws(*key):
        return torch.randn(8, generator=torch_stream(*key))
    base = draws(3, 5, 2, Purpose.PROBE)
    assert torch.equal(base, draws(3, 5, 2, Purpose.PROBE))  # every rank, and again after a resume
    for other in [(4, 5, 2, Purpose.PROBE), (3, 6, 2, Purpose.PROBE), (3, 5, 1, Purpose.PROBE),
                  (3, 5, 2, Purpose.POWER_INIT)]:
        assert not torch.equal(base, draws(*other)), other
    assert len({int(p) for p in Purpose}) == len(Purpose)
