#!/usr/bin/env bash
# Join this machine to a midiforge Ray cluster (every node needs the same midiforge install).
#
#   cluster/start-worker.sh HEAD_ADDRESS:6379 [--node-ip-address IP] [other `ray start` flags, e.g. --num-gpus 1]
#
# - ray: $MIDIFORGE_VENV/bin/ray, else ray on PATH, else this repository's .venv (see ray-env.sh).
# - Node address: --node-ip-address, else $RAY_NODE_IP, else Ray's own choice.
# - Token authentication is on: the head's token must be here, as $RAY_AUTH_TOKEN or in the file
#   $RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token; copy the head's file there).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/ray-env.sh"

[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || die "usage: start-worker.sh HEAD_ADDRESS:PORT [ray start flags]"
head="$1"; shift
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
  die "no Ray auth token: copy the head's token file to $RAY_AUTH_TOKEN_PATH (or set RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN)"
fi
node_ip=()
case " $* " in
  *" --node-ip-address"*) ;;
  *) [ -z "${RAY_NODE_IP:-}" ] || node_ip=(--node-ip-address="$RAY_NODE_IP") ;;
esac
echo "start-worker: ray $ray_bin; joining $head" >&2
exec "$ray_bin" start --address="$head" ${node_ip[@]+"${node_ip[@]}"} "$@"
