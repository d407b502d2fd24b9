"""The knobs every trainer has: --grad-clip and --accumulate, under a real mpiexec."""
import json

import h5py
import numpy as np

from helpers import trainer


def train(run_dir, *flags, n=2):
    r = trainer(n, "--run-dir", run_dir, "--progress", "never", *flags)
    assert r.returncode == 0, r.stderr
    return r


def lines(run_dir, kind="train"):
    return [x for x in map(json.loads, open(run_dir / "metrics.jsonl")) if x["kind"] == kind]


def checkpoint(run_dir, step):
    """(the model's arrays, the residuals' arrays), by name."""
    with h5py.File(run_dir / "checkpoints" / f"ckpt-{step:09d}.h5", "r") as f:
        residual = {}
        if "compressor/residual" in f:
            f["compressor/residual"].visititems(lambda k, v: residual.__setitem__(k, v[()])
                                                if isinstance(v, h5py.Dataset) else None)
        return {k: f["model"][k][()] for k in f["model"]}, residual


def test_accumulated_micro_batches_equal_one_batch_k_times_as_large(tmp_path):
    for compressor in ("dense", "greedylore"):
        whole, parts = tmp_path / f"{compressor}-1x32", tmp_path / f"{compressor}-4x8"
        train(whole, "--compressor", compressor, "--steps", 20, "--batch-size", 32)
        r = train(parts, "--compressor", compressor, "--steps", 20, "--batch-size", 8, "--accumulate", 4)
        assert "2 ranks x 8 samples per rank x 4 micro-batches = global batch 64" in r.stdout
        a, b = checkpoint(whole, 20)[0], checkpoint(parts, 20)[0]
        # the same samples, the loss a mean over them: equal up to the order of float sums (a loss
        # that was not divided by 4 or other rows would move the weights by ~1e-2)
        for k in a:
            assert np.max(np.abs(a[k] - b[k])) <= 1e-5 * np.max(np.abs(a[k])), (compressor, k)
        # one exchange per optimizer step: the same bytes on the wire as the undivided batch
        assert [x["wire_bytes"] for x in lines(parts)] == [x["wire_bytes"] for x in lines(whole)]
        assert np.allclose([x["loss"] for x in lines(parts)], [x["loss"] for x in lines(whole)], rtol=1e-5)


def test_grad_clip_bounds_the_agreed_step_and_leaves_the_residual_what_was_sent(tmp_path):
    plain = ["--compressor", "powersgd", "--start-compress-step", 0, "--momentum", 0, "--warmup-steps", 0,
             "--lr-schedule", "constant", "--lr", 0.1, "--steps", 2, "--checkpoint-every", 1, "--keep-last", 0]
    train(tmp_path / "free", *plain)
    train(tmp_path / "clipped", *plain, "--grad-clip", 0.05)
    clipped = lines(tmp_path / "clipped")
    assert "grad_norm" not in lines(tmp_path / "free")[-1]
    assert clipped[-1]["grad_norm"] > 0.05
    # plain SGD: the parameters moved by lr x the clipped gradient, whose norm is the bound
    before, _ = checkpoint(tmp_path / "clipped", 1)
    after, _ = checkpoint(tmp_path / "clipped", 2)
    moved = np.sqrt(sum(np.sum((after[k].astype(np.float64) - before[k]) ** 2) for k in after))
    assert abs(moved / 0.1 - 0.05) <= 1e-4 * 0.05
    # step 1 saw the same initial weights in both runs: clipping after the exchange changed the
    # update, not what error feedback kept
    free_model, free_residual = checkpoint(tmp_path / "free", 1)
    clipped_model, clipped_residual = checkpoint(tmp_path / "clipped", 1)
    assert free_residual and all(np.array_equal(free_residual[k], clipped_residual[k]) for k in free_residual)
    assert not all(np.array_equal(free_model[k], clipped_model[k]) for k in free_model)
