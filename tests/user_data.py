"""Datasets a user might bring with --dataset user_data:NAME (tests put this folder on PYTHONPATH)."""
from pathlib import Path

import h5py
import numpy as np
import torch

DIGITS = Path(__file__).resolve().parent.parent / "data" / "digits.h5"
INFO = {"task": "classify", "input_shape": [1, 8, 8], "num_classes": 10}


def _arrays():
    with h5py.File(DIGITS, "r") as f:
        return {key: f[key][()] for key in ("x_train", "y_train", "x_test", "y_test")}


def digits_arrays():
    return _arrays(), INFO


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def digits_torch():
    a = _arrays()
    return (Rows(a["x_train"], a["y_train"]), Rows(a["x_test"], a["y_test"])), INFO


def returns_nonsense():
    return 42


def labels_missing():
    a = _arrays()
    return {"x_train": a["x_train"], "x_test": a["x_test"]}, INFO
