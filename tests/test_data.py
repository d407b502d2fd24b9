"""Sharding and reading of the bundled HDF5 datasets; damaged and inconsistent data files."""
import json
import os
import shutil
import sys
import time

import h5py
import numpy as np
import pytest

from helpers import WORKERS, run, trainer
from mpitrain.config import UsageError
from mpitrain import schema
from mpitrain.data import ArrayData, Dataset, ShardedBatches, TorchData, check_file, locate


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


def replace(f, key, data):
    del f[key]
    f[key] = data


EDITS = [  # (bundled file, an edit, what the one line must say)
    ("digits", lambda f: f.attrs.__setitem__("input_shape", "[1, 8"), "input_shape is not JSON"),
    ("digits", lambda f: f.attrs.__setitem__("input_shape", "[1, 9, 9]"), "do not hold input_shape (1, 9, 9)"),
    ("digits", lambda f: f.attrs.__setitem__("input_shape", "[0, 8, 8]"), "list of positive sizes"),
    ("digits", lambda f: f.attrs.__setitem__("num_classes", 5), "y_train has labels (num_classes 5) outside 0..4"),
    ("digits", lambda f: f.attrs.__setitem__("num_classes", -1), "num_classes must be a positive integer"),
    ("digits", lambda f: replace(f, "x_train", np.array([b"abc"] * 4)), "x_train must be rows of numbers"),
    ("digits", lambda f: replace(f, "y_test", np.zeros(3, np.uint8)), "y_test must be one integer label per row"),
    ("digits", lambda f: replace(f, "y_test", f["y_test"][...].astype(np.float32)), "one integer label per row"),
    ("digits", lambda f: replace(f, "x_train", np.zeros((0, 8, 8), np.float32)), "x_train has no rows"),
    ("digits", lambda f: f.__delitem__("y_train"), "missing ['y_train']"),
    ("shakespeare", lambda f: f.attrs.__setitem__("vocab", '"abc"'), "vocab must be a list of strings"),
    ("shakespeare", lambda f: replace(f, "x_test", f["x_test"][:, :10]), "as long as x_train's"),
    ("shakespeare", lambda f: replace(f, "x_test", f["x_test"][...].astype(np.float32)), "rows of token ids"),
]


@pytest.mark.parametrize("name,edit,mention", EDITS, ids=[e[2] for e in EDITS])
def test_an_inconsistent_data_file_is_refused_when_opened(tmp_path, name, edit, mention):
    path = tmp_path / "edited.h5"
    shutil.copy(locate(name), path)
    with h5py.File(path, "r+") as f:
        edit(f)
    with pytest.raises(UsageError) as refused:
        Dataset(path)
    assert mention in str(refused.value) and str(path) in str(refused.value)


def test_token_ids_outside_the_vocab_are_refused_when_read(tmp_path):
    path = tmp_path / "edited.h5"
    shutil.copy(locate("shakespeare"), path)
    with h5py.File(path, "r+") as f:
        size = len(json.loads(f.attrs["vocab"]))
        x = f["x_train"][...]
        x[5, 3] = size
        replace(f, "x_train", x)
    ds = Dataset(path)  # token ids are checked batch by batch: reading a large corpus whole would be slow
    ds.rows("train", np.array([0, 4, 6]))
    with pytest.raises(UsageError, match=f"token ids \\(vocab size {size}\\) outside 0..{size - 1}"):
        ds.rows("train", np.array([0, 5]))


def test_arrays_and_torch_datasets_with_labels_outside_num_classes_are_refused():
    x, y = np.zeros((4, 3), np.float32), np.array([0, 1, 2, 3])
    ArrayData({"task": "classify", "num_classes": 4}, x, y)
    with pytest.raises(UsageError, match="y_train has labels outside 0..2"):
        ArrayData({"task": "classify", "num_classes": 3}, x, y)
    with pytest.raises(UsageError, match="num_classes must be positive"):
        ArrayData({"task": "classify", "num_classes": 0}, x, y)
    items = TorchData({"task": "classify", "num_classes": 3}, list(zip(x, y)), name="mine")
    items.rows("train", np.array([0, 2]))  # a torch Dataset is checked as it is read
    with pytest.raises(UsageError, match="mine: train labels outside 0..2"):
        items.rows("train", np.array([1, 3]))


def test_a_damaged_data_file_is_one_line_never_a_traceback(tmp_path):
    # every 53rd byte of digits.h5 inverted, each in its own copy, opened and read whole
    r = run([sys.executable, WORKERS / "fuzz_data.py", "digits", tmp_path, "53"], timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines() if "offset" in x]
    assert len(rows) == -(-locate("digits").stat().st_size // 53)
    assert not [row for row in rows if "escaped" in row], [row["escaped"] for row in rows if "escaped" in row][0]
    refused = [row["usage"] for row in rows if "usage" in row]
    assert all(str(tmp_path / "damaged.h5") in line for line in refused)  # each names the file
    assert sum("is damaged (reading x_" in line for line in refused) > len(rows) // 2  # the compressed rows
    assert any("(reading" not in line for line in refused)  # and some of the headers, found on opening


def test_a_data_file_that_hdf5_cannot_finish_opening_is_a_fault_line_at_the_deadline(tmp_path, monkeypatch):
    # a damaged file can send HDF5 into a loop no signal interrupts; a named pipe with no writer
    # blocks its open the same way, and before the child-process check it hung the caller for good
    pipe = tmp_path / "pipe.h5"
    os.mkfifo(pipe)
    monkeypatch.setattr(schema, "DEADLINE_S", 3.0)
    started = time.monotonic()
    with pytest.raises(UsageError) as refused:
        Dataset(pipe)
    assert str(refused.value) == (f"data file {pipe}: reading it did not finish in 3 s "
                                  "(a damaged file can send HDF5 into a loop)")
    assert time.monotonic() - started < 30


def test_the_child_check_walks_the_chunk_index_and_reads_the_first_and_last_rows(tmp_path):
    assert check_file(locate("digits")) == []
    path = tmp_path / "digits.h5"
    shutil.copy(locate("digits"), path)
    with h5py.File(path, "r") as f:
        x = f["x_test"].id
        chunk = x.get_chunk_info(x.get_num_chunks() - 1)
    data = bytearray(path.read_bytes())
    data[chunk.byte_offset + chunk.size // 2] ^= 0xFF  # in the chunk that holds x_test's last rows
    path.write_bytes(data)
    Dataset(path, isolated=False)  # the open alone reads no rows of x_test
    [fault] = check_file(path)
    assert fault.startswith(f"data file {path} is damaged (reading x_test): "), fault
    with pytest.raises(UsageError, match=f"data file {path} is damaged \\(reading x_test\\)"):
        Dataset(path)


def test_a_damaged_row_found_mid_run_ends_the_job_with_one_line_and_exit_2(tmp_path):
    path = tmp_path / "digits.h5"
    shutil.copy(locate("digits"), path)
    with h5py.File(path, "r") as f:
        x = f["x_train"].id
        assert x.get_num_chunks() >= 3
        chunk = x.get_chunk_info(x.get_num_chunks() // 2)  # neither the first rows nor the last: opening reads those
    data = bytearray(path.read_bytes())
    data[chunk.byte_offset + chunk.size // 2] ^= 0xFF  # deflate's checksum fails when the rows are read
    path.write_bytes(data)
    r = trainer(2, "--dataset", path, "--steps", 20, "--run-dir", tmp_path / "run")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "mpitrain: error: rank " in r.stderr and f"data file {path} is damaged (reading x_train)" in r.stderr
