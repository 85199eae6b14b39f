#!/bin/bash
# Submit the three stages as one Slurm dependency chain: preprocess -> train -> generate (--dependency=afterok),
# each as its own batch job with its own size.
#
#   slurm/pipeline.sh SRC OUT --num-pieces M
#   PREPROCESS_NODES=4 TRAIN_NODES=2 GENERATE_NODES=4 SBATCH_ARGS="--partition=cpu --account=me" \
#   TRAIN_SBATCH_ARGS="--partition=gpu --gpus-per-task=1" TRAIN_ARGS="--epochs 20" \
#   GENERATE_ARGS="--no-midi-files --seed 1" slurm/pipeline.sh s3://b/corpus s3://b/run --num-pieces 1000000
#
# OUT receives tokens/, model/ and pieces/. Extra flags: PREPROCESS_ARGS, TRAIN_ARGS, GENERATE_ARGS (for midiforge),
# SBATCH_ARGS (every job), PREPROCESS_SBATCH_ARGS, TRAIN_SBATCH_ARGS, GENERATE_SBATCH_ARGS (one job each).
# Prints the three job ids; `squeue --me` shows the chain, and a failed stage cancels the ones after it
# (--kill-on-invalid-dep=yes).
set -euo pipefail
usage="usage: slurm/pipeline.sh SRC OUT --num-pieces M"
[ "$#" -eq 4 ] && [ "$3" = "--num-pieces" ] || { echo "$usage" >&2; exit 2; }
src="$1"; out="${2%/}"; pieces="$4"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
common=(--parsable --kill-on-invalid-dep=yes ${SBATCH_ARGS:-})
pre=$(sbatch "${common[@]}" --nodes="${PREPROCESS_NODES:-1}" ${PREPROCESS_SBATCH_ARGS:-} \
      "$here/preprocess.sbatch" "$src" "$out/tokens" ${PREPROCESS_ARGS:-})
train=$(sbatch "${common[@]}" --dependency="afterok:${pre%%;*}" --nodes="${TRAIN_NODES:-1}" ${TRAIN_SBATCH_ARGS:-} \
        "$here/train.sbatch" "$out/tokens" "$out/model" ${TRAIN_ARGS:-})
gen=$(sbatch "${common[@]}" --dependency="afterok:${train%%;*}" --nodes="${GENERATE_NODES:-1}" ${GENERATE_SBATCH_ARGS:-} \
      "$here/generate.sbatch" "$out/model" "$out/pieces" --num-pieces "$pieces" ${GENERATE_ARGS:-})
echo "midiforge pipeline: preprocess ${pre%%;*} -> train ${train%%;*} -> generate ${gen%%;*}; outputs under $out"
echo "${pre%%;*} ${train%%;*} ${gen%%;*}"
