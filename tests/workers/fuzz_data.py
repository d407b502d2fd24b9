"""Damage copies of a bundled dataset file byte by byte and read each whole through data.Dataset.

    python fuzz_data.py NAME OUT_DIR STRIDE

Byte k*STRIDE of NAME's file (every k) is inverted in its own copy. One JSON line per copy in
OUT_DIR/results.jsonl: the offset and the outcome: "read" (opened and every row read), the
UsageError's line, or the traceback of anything else that escaped (there should be none). A line
`{"start": OFFSET}` precedes each, so a hang names its copy.
"""
import json
import sys
import traceback
from pathlib import Path

import numpy as np

from mpitrain.config import UsageError
from mpitrain.data import Dataset, locate

name, out, stride = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
good = locate(name).read_bytes()
with open(out / "results.jsonl", "w") as log:
    for offset in range(0, len(good), stride):
        print(json.dumps({"start": offset}), file=log, flush=True)
        damaged = bytearray(good)
        damaged[offset] ^= 0xFF
        path = out / "damaged.h5"
        path.write_bytes(damaged)
        try:
            ds = Dataset(path, isolated=False)  # the checks themselves, without a child process per copy
            for split, n in (("train", ds.n_train), ("test", ds.n_test)):
                for lo in range(0, n, 256):
                    ds.rows(split, np.arange(lo, min(n, lo + 256)))
            ds.close()
            outcome = {"read": True}
        except UsageError as e:
            outcome = {"usage": str(e)}
        except BaseException:  # noqa: BLE001  (what the test looks for)
            outcome = {"escaped": traceback.format_exc()}
        print(json.dumps({"offset": offset, **outcome}), file=log, flush=True)
