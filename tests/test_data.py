"""Sharding and reading of the bundled HDF5 datasets."""
import numpy as np
import pytest

from mpitrain.data import Dataset, ShardedBatches, locate


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_each_epoch_is_one_shuffle_split_disjointly_across_ranks(size):
    ds = Dataset(locate("digits"))
    shards = [ShardedBatches(ds, 16, r, size, seed=5) for r in range(size)]
    for epoch in (0, 1):
        rows = [s.epoch_rows(epoch) for s in shards]
        flat = np.concatenate([r.reshape(-1) for r in rows])
        assert len(set(flat.tolist())) == flat.size  # disjoint across ranks and steps
        assert flat.size == shards[0].steps_per_epoch * size * 16
        # step t on all ranks together is the step-t batch of a single process with batch size*16
        single = ShardedBatches(ds, 16 * size, 0, 1, seed=5).epoch_rows(epoch)
        for t in range(shards[0].steps_per_epoch):
            assert np.array_equal(np.concatenate([r[t] for r in rows]), single[t])
    assert not np.array_equal(shards[0].epoch_rows(0), shards[0].epoch_rows(1))


def test_rows_come_back_in_the_order_asked():
    ds = Dataset(locate("digits"))
    idx = np.array([7, 3, 900, 3])
    x, y = ds.rows("train", idx)
    for k, i in enumerate(idx):
        xi, yi = ds.rows("train", np.array([i]))
        assert np.array_equal(x[k], xi[0]) and y[k] == yi[0]
    assert x.shape == (4, 1, 8, 8) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1


def test_language_model_targets_are_inputs_shifted_by_one():
    ds = Dataset(locate("shakespeare"))
    x, y = ds.rows("train", np.array([0, 1]))
    assert x.shape == y.shape == (2, ds.info["seq_len"])
    assert np.array_equal(x[:, 1:], y[:, :-1])
    text = "".join(ds.info["vocab"][i] for i in x[0])
    assert text.isprintable() or "\n" in text


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "mnist1d", "shakespeare"])
def test_bundled_files_are_small_real_and_split(name):
    path = locate(name)
    assert path.stat().st_size <= 10 * 2**20
    ds = Dataset(path)
    assert ds.n_train > ds.n_test > 0
