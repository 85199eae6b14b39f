#!/usr/bin/env bash
# Start a Ray head on this machine for midiforge jobs (every node needs the same midiforge install).
#   cluster/start-head.sh [--num-cpus N]      then: export RAY_ADDRESS=127.0.0.1:6379 (or the head's address)
set -euo pipefail
exec ray start --head --port="${RAY_PORT:-6379}" --dashboard-host="${RAY_DASHBOARD_HOST:-127.0.0.1}" "$@"
