#!/usr/bin/env bash
# Here, without a scheduler: NP=4 jobs/local.sh --run-dir runs/x [mpitrain flags...]
# Resumes from RUN_DIR's checkpoints when there are any. Send SIGUSR1 or SIGTERM to this
# process to stop: the ranks write a checkpoint and the script exits 75; run it again to go on.
set -u
PYTHON=${PYTHON:-python3}
NP=${NP:-4}
# The mpiexec beside the python (the venv's, from the mpich extra) before any on PATH.
MPIEXEC=${MPIEXEC:-$(dirname "$(command -v "$PYTHON")")/mpiexec}
[ -x "$MPIEXEC" ] || MPIEXEC=$(command -v mpiexec)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$MPIEXEC" -n "$NP" "$PYTHON" -m mpitrain --resume auto "$@"
