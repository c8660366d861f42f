#!/bin/bash
# Runs the ablation on every worker of a Cloud TPU VM slice (one process per host).
#
#   scripts/launch_tpu_vm.sh TPU_NAME ZONE -- --config=configs/ablation.py --workdir=/mnt/shared/wbc \
#       '--config.ablation.regimes=("original","original+trad")'
#   (the GAN regimes and measures run in one process only: train them without this launcher)
#
# Everything after `--` goes to `python -m wbc_jax.main`, started on all workers at once
# through `gcloud compute tpus tpu-vm ssh --worker=all`. On a TPU VM wbc_jax.main calls
# jax.distributed.initialize() with no arguments; jax reads the workers, this worker's
# rank and the coordinator from the TPU metadata.
#
# Each worker needs the repository at the same path with wbc_jax installed (jax[tpu]),
# the BCCD files (--config.data.manual_dir or WBC_JAX_MANUAL_DIR), and a work directory
# that all workers share (NFS / Filestore / a gcsfuse mount): Orbax checkpoints are
# written by all processes, reports by process 0.
#
# Environment:
#   WBC_JAX_REPO     the repository's path on the workers (default: ~/wbc_jax)
#   WBC_JAX_VENV     virtual environment to activate there (default: $WBC_JAX_REPO/.venv)
#   WBC_JAX_PROJECT  gcloud project (default: gcloud's)
#   WBC_JAX_SETUP    a command run on every worker first, e.g. "git pull && pip install -e ."

set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,8p' "$0" >&2
  exit 2
fi
TPU_NAME="$1"
ZONE="$2"
shift 2
if [[ "${1:-}" == "--" ]]; then
  shift
fi

REPO="${WBC_JAX_REPO:-~/wbc_jax}"
VENV="${WBC_JAX_VENV:-${REPO}/.venv}"
ARGS="$(printf '%q ' "$@")"
REMOTE="set -e; cd ${REPO}; if [ -f ${VENV}/bin/activate ]; then source ${VENV}/bin/activate; fi; "
if [[ -n "${WBC_JAX_SETUP:-}" ]]; then
  REMOTE+="${WBC_JAX_SETUP}; "
fi
REMOTE+="python -m wbc_jax.main ${ARGS}"

PROJECT_FLAG=()
if [[ -n "${WBC_JAX_PROJECT:-}" ]]; then
  PROJECT_FLAG=(--project="${WBC_JAX_PROJECT}")
fi

echo "on every worker of ${TPU_NAME} (${ZONE}): ${REMOTE}"
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} \
  --worker=all --command="${REMOTE}"
