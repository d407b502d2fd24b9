#!/bin/bash
# PBS Pro / OpenPBS: qsub [-v RUN_DIR=...] jobs/pbs.sh   (flags for mpitrain: MPITRAIN_* variables)
# Rerunnable (-r y): on preemption PBS sends SIGTERM; the ranks agree at the end of the step,
# write a checkpoint and exit 75; this script then asks PBS to rerun the job, which resumes
# from RUN_DIR/checkpoints/latest.
#PBS -N mpitrain
#PBS -l select=2:ncpus=32:mpiprocs=8:ompthreads=4
#PBS -l walltime=12:00:00
#PBS -r y
#PBS -j oe
set -u
cd "${PBS_O_WORKDIR:-.}"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export MPITRAIN_THREADS=$OMP_NUM_THREADS
export HDF5_USE_FILE_LOCKING=FALSE
RUN_DIR=${RUN_DIR:-runs/pbs-${PBS_JOBID%%.*}}
PYTHON=${PYTHON:-python}
NP=$(wc -l < "$PBS_NODEFILE")

mpiexec -n "$NP" "$PYTHON" -m mpitrain --run-dir "$RUN_DIR" --resume auto "$@"
rc=$?
if [ "$rc" -eq 75 ]; then
    echo "mpitrain checkpointed after a signal; asking PBS to rerun ${PBS_JOBID}"
    qrerun "$PBS_JOBID"
    exit 0
fi
exit "$rc"
