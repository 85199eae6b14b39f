#!/usr/bin/env bash
# `ray job submit` of midiforge generate (see jobs/submit.sh for the environment it needs):
#   RAY_ADDRESS=http://HEAD:8265 jobs/generate.sh MODEL_DIR DEST --num-pieces M [flags]
exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" generate "$@"
