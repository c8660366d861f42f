#!/usr/bin/env bash
# One-at-a-time arms of the strong baseline (experiments/baseline/removal.md): the 5 folds of
# repeat 0, seed 0, cellnet only, each arm with one part of the recipe changed.
#
#   BASE=configs/baseline.py:cv bash scripts/removal_arms.sh box norot 48px
#
# Each arm trains into ${WORKDIRS:-workdirs}/removal_ARM (a finished split is kept, so a cut-off
# arm resumes) and logs to removal_ARM.log beside it; scripts/removal_table.py builds the table.
set -euo pipefail
base=${BASE:-configs/baseline.py:cv}
out=${WORKDIRS:-workdirs}
mkdir -p "$out"
common=(--config.num_seeds=1 --config.split.max_splits=5 "--config.ablation.models=('cellnet',)")
run() {
  local name=$1; shift
  echo "$(date -u +%FT%TZ) start $name" >> "$out/removals.log"
  local rc=0
  python -m wbc_jax.main --config="$base" "${common[@]}" "$@" --workdir="$out/removal_$name" \
      > "$out/removal_$name.log" 2>&1 || rc=$?
  echo "$(date -u +%FT%TZ) end $name rc=$rc" >> "$out/removals.log"
  return $rc
}
[ $# -gt 0 ] || { echo "usage: $0 ARM... (arms: box box80 box96 uniform balanced sqrt norot 48px 80px)" >&2; exit 2; }
for arm in "$@"; do
  case $arm in
    box) run box --config.data.crop_mode=box ;;
    box80) run box80 --config.data.crop_mode=box --config.data.crop_size=80 ;;
    box96) run box96 --config.data.crop_mode=box --config.data.crop_size=96 ;;
    uniform) run uniform --config.train.sampling=uniform ;;
    balanced) run balanced --config.train.sampling=balanced ;;
    sqrt) run sqrt --config.train.sampling=sqrt ;;
    norot) run norot --config.augment.rot90=False --config.augment.rotation_deg=0.0 ;;
    48px) run 48px --config.data.crop_size=48 ;;
    80px) run 80px --config.data.crop_size=80 ;;
    *) echo "$0: unknown arm '$arm'" >&2; exit 2 ;;
  esac
done
