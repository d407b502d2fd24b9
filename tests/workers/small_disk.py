"""The command on a disk of QUOTA bytes: free space as the checkpoint writer sees it is QUOTA less
what the run directory holds (the rest of the machine's disk is not involved).

    python small_disk.py QUOTA [trainer flags...]   (with --run-dir)
"""
import shutil
import sys
from pathlib import Path

from mpitrain import cli

quota, argv = int(sys.argv[1]), sys.argv[2:]
run_dir = Path(argv[argv.index("--run-dir") + 1])
real = shutil.disk_usage


def disk_usage(path):
    used = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    return real(path)._replace(total=quota, used=used, free=max(0, quota - used))


shutil.disk_usage = disk_usage
sys.exit(cli.main(argv))
