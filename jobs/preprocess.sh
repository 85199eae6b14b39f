#!/usr/bin/env bash
# `ray job submit` of midiforge preprocess (see jobs/submit.sh for the environment it needs):
#   RAY_ADDRESS=http://HEAD:8265 jobs/preprocess.sh SRC DEST [flags]
exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" preprocess "$@"
