#!/usr/bin/env bash
# Join this machine to a Ray head:  cluster/start-worker.sh HEAD_ADDRESS:6379 [--num-cpus N] [--num-gpus G]
set -euo pipefail
head="${1:?usage: start-worker.sh HEAD_ADDRESS:PORT [ray start flags]}"; shift
exec ray start --address="$head" "$@"
