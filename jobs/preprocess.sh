#!/usr/bin/env bash
# Submit `midiforge preprocess` as a Ray job to a running cluster (see cluster/).
#   RAY_ADDRESS=http://HEAD:8265 jobs/preprocess.sh SRC DEST [preprocess flags...]
# The job's driver runs on the head node and joins the cluster itself (RAY_ADDRESS is set there by Ray).
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster's job server, e.g. http://127.0.0.1:8265}"
exec ray job submit --address "$RAY_ADDRESS" -- midiforge preprocess "$@"
