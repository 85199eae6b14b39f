#!/usr/bin/env bash
# `ray job submit` of midiforge train (see jobs/submit.sh for the environment it needs):
#   RAY_ADDRESS=http://HEAD:8265 jobs/train.sh SHARDS MODEL_DIR --launcher ray --num-workers N [flags]
exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" train "$@"
