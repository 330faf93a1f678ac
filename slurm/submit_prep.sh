#!/bin/bash
# NAME
#   submit_prep.sh - submit a data-prep job array and its finalize job (--dependency=afterok on the array).
#
# SYNOPSIS
#   slurm/submit_prep.sh [SBATCH OPTIONS FOR THE ARRAY] -- DATA-PREP ARGUMENTS
#   slurm/submit_prep.sh --array=0-63 --cpus-per-task=8 -- imagenet --root /datasets/ILSVRC2012 --out /scratch/imagenet
#   slurm/submit_prep.sh --array=0-3 -- idx --dir /usr/share/datasets/fashion-mnist --out data/fashion-mnist
#   Prints the two job ids ("<array id> <finalize id>"). If a task fails, finalize never runs (Slurm cancels it,
#   DependencyParameters=kill_invalid_depend, or leaves it pending with DependencyNeverSatisfied): re-run the
#   task (NUM_TASKS=N sbatch --array=K slurm/prep_imagenet.sbatch ...), then finalize by hand.
#
# KNOBS (environment variables)
#   WAIT=1         wait for the finalize job (sbatch --wait) and exit with its exit code
#   FINALIZE_ARGS  sbatch options for the finalize job (e.g. "--partition=short")
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export HPCDNN_HOME=${HPCDNN_HOME:-$(dirname "$here")}  # the jobs find slurm/env.sh there, wherever this is run from
opts=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
[ "${1:-}" = -- ] || { sed -n '2,17p' "$0" >&2; exit 2; }
shift
out=
prev=
for a in "$@"; do
  case $a in --out=*) out=${a#--out=} ;; esac
  [ "$prev" = --out ] && out=$a
  prev=$a
done
[ -n "$out" ] || { echo "submit_prep.sh: the data-prep arguments need --out DIR" >&2; exit 2; }
array=$(sbatch --parsable "${opts[@]}" "$here/prep_imagenet.sbatch" "$@")
array=${array%%;*}
# shellcheck disable=SC2086
if [ "${WAIT:-0}" = 1 ]; then
  echo "$array"
  exec sbatch --wait --dependency=afterok:"$array" ${FINALIZE_ARGS:-} "$here/prep_finalize.sbatch" "$out"
fi
final=$(sbatch --parsable --dependency=afterok:"$array" ${FINALIZE_ARGS:-} "$here/prep_finalize.sbatch" "$out")
echo "$array ${final%%;*}"
