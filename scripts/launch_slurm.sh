#!/bin/bash
# Runs the ablation on a set of GPU nodes with Slurm: one process per GPU (the default
# here) or one per node; the processes find each other through jax.distributed.
#
#   sbatch scripts/launch_slurm.sh --config=configs/ablation.py --workdir=/shared/wbc/ablation \
#       '--config.ablation.regimes=("original","original+trad")'
#   (the GAN regimes and measures run in one process only: train them without this launcher)
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 scripts/launch_slurm.sh ...
#   sbatch --ntasks-per-node=1 scripts/launch_slurm.sh ...     # one process per node
#
# Everything after the script name goes to `python -m wbc_jax.main`. wbc_jax.main sees
# SLURM_NTASKS > 1 and calls jax.distributed.initialize(), which reads the rank, the
# task count and the coordinator (the first node of the step) from srun's environment.
# The work directory must be on a filesystem that every node sees at the same path
# (Orbax writes one checkpoint from all processes; process 0 writes the reports).
# Prepare the dataset once before the first job (python -c "import wbc_jax, ..."; see
# README) or let process 0 do it: the others wait for it.
#
# The seeds are spread over all GPUs of the job: config.num_seeds must be a multiple of
# config.mesh.seed (-1 = every GPU of the job), e.g. --config.num_seeds=16 on 2 x 8 GPUs,
# or use --config.mesh.data to split each seed's batch as well.
#
# Environment: WBC_JAX_VENV (default: .venv of the repository) is activated if present.
#
#SBATCH --job-name=wbc_jax
#SBATCH --nodes=2
#SBATCH --gpus-per-node=4
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
VENV="${WBC_JAX_VENV:-.venv}"
if [[ -f "${VENV}/bin/activate" ]]; then
  # shellcheck disable=SC1091
  source "${VENV}/bin/activate"
fi

TASKS_PER_NODE="${SLURM_NTASKS_PER_NODE:-1}"
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}"
GPUS_PER_NODE="${GPUS_PER_NODE##*:}"   # "a100:4" -> "4"
if [[ "${TASKS_PER_NODE%%(*}" == "1" ]]; then
  # One process per node: it drives every GPU of its node. (jax's Slurm detection would
  # otherwise give each process the one GPU of its local rank.)
  export JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
fi

echo "wbc_jax on ${SLURM_JOB_NUM_NODES:-1} nodes, ${SLURM_NTASKS:-1} tasks, ${GPUS_PER_NODE} GPUs per node"
# Every task sees all GPUs of its node (no per-task binding); jax picks its own.
# --kill-on-bad-exit: one failed process ends the step instead of leaving the others
# waiting in a collective.
srun --kill-on-bad-exit=1 --gpu-bind=none python -m wbc_jax.main "$@"
