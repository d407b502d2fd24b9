"""Several runs of one worker in one launch: every rank runs the worker's script anew for each
argument list, in order, sharing the MPI world's start and the imports (which are most of a small
worker's time: each rank imports torch).

    mpiexec -n N python runs.py WORKER '[[args of run 1...], [args of run 2...], ...]'
"""
import json
import runpy
import sys

worker, runs = sys.argv[1], json.loads(sys.argv[2])
for args in runs:
    sys.argv = [worker, *args]
    runpy.run_path(worker, run_name="__main__")
