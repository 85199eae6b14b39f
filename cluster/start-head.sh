#!/usr/bin/env bash
# Start the Ray head of a midiforge cluster on this machine (every node needs the same midiforge install).
#
#   cluster/start-head.sh [--node-ip-address IP] [--dashboard-host HOST] [other `ray start` flags, e.g. --num-cpus N --block]
#
# - ray: $MIDIFORGE_VENV/bin/ray, else ray on PATH, else this repository's .venv (see ray-env.sh).
# - Node address: --node-ip-address, else $RAY_NODE_IP, else the first address of `hostname -I`.
# - The dashboard and its job server (`ray job submit`) listen on --dashboard-host, by default the node
#   address (reachable by the other nodes and by drivers on that network). --dashboard-host 0.0.0.0
#   exposes it on every interface of the machine: do that only behind a firewall or security group.
# - Token authentication is on: the token is $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH
#   (default ~/.ray/auth_token), created here if missing. Copy that file to every worker and driver.
# - GCS port: --port, else $RAY_PORT, else 6379; dashboard port: --dashboard-port, else 8265.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/ray-env.sh"

node_ip="${RAY_NODE_IP:-}" dashboard_host="" dashboard_port=8265 gcs_port="${RAY_PORT:-6379}" args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --node-ip-address=*) node_ip="${1#*=}" ;;
    --node-ip-address) node_ip="${2:?--node-ip-address needs a value}"; shift ;;
    --dashboard-host=*) dashboard_host="${1#*=}" ;;
    --dashboard-host) dashboard_host="${2:?--dashboard-host needs a value}"; shift ;;
    --dashboard-port=*) dashboard_port="${1#*=}" ;;
    --dashboard-port) dashboard_port="${2:?--dashboard-port needs a value}"; shift ;;
    --port=*) gcs_port="${1#*=}" ;;
    --port) gcs_port="${2:?--port needs a value}"; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done
[ -n "$node_ip" ] || node_ip="$(hostname -I 2>/dev/null | awk '{print $1}')"
[ -n "$node_ip" ] || die "no node address: pass --node-ip-address IP or set RAY_NODE_IP"
dashboard_host="${dashboard_host:-$node_ip}"

if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
  mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
  (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$RAY_AUTH_TOKEN_PATH.tmp.$$")
  mv "$RAY_AUTH_TOKEN_PATH.tmp.$$" "$RAY_AUTH_TOKEN_PATH"
  echo "start-head: new Ray auth token written to $RAY_AUTH_TOKEN_PATH" >&2
fi
[ "$dashboard_host" = 0.0.0.0 ] && url_host="$node_ip" || url_host="$dashboard_host"
echo "start-head: ray $ray_bin; GCS $node_ip:$gcs_port; dashboard/job server http://$url_host:$dashboard_port (bound to $dashboard_host)" >&2
echo "start-head: token ${RAY_AUTH_TOKEN_PATH:-from RAY_AUTH_TOKEN}; workers and drivers need RAY_AUTH_MODE=token and that token (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)" >&2
echo "start-head: then  cluster/start-worker.sh $node_ip:$gcs_port   |   RAY_ADDRESS=http://$url_host:$dashboard_port jobs/preprocess.sh SRC DEST" >&2
exec "$ray_bin" start --head --port="$gcs_port" --node-ip-address="$node_ip" \
  --dashboard-host="$dashboard_host" --dashboard-port="$dashboard_port" ${args[@]+"${args[@]}"}
