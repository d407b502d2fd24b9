"""Two tiers: `python -m pytest` runs the fast one (the core contracts, real mpiexec, minutes);
`python -m pytest --full` runs every test (CI). A test or module marked `full` runs only in the
full suite: long convergence checks, fuzzing, every-compressor sweeps, emulated clusters."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="run every test (CI runs this); without it, the fast tier")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: runs only in the full suite (python -m pytest --full)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    later = [item for item in items if item.get_closest_marker("full")]
    if later:
        config.hook.pytest_deselected(items=later)
        items[:] = [item for item in items if not item.get_closest_marker("full")]
