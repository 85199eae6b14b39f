#!/usr/bin/env bash
# What the Slurm test cluster (tests/slurmcluster.py, marker "cluster") needs on a Debian machine, as
# root: Slurm (slurmctld, slurmd, client commands), munge, iproute2 (ip netns) and util-linux (nsenter,
# unshare).  Idempotent: installs only what is missing, runs `apt-get update` at most once.  Starts no
# daemon (the pytest fixture starts its own munged/slurmctld/slurmd and stops them).
set -euo pipefail

need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge ip:iproute2 \
            nsenter:util-linux unshare:util-linux; do
  bin=${pair%%:*}
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need+=("${pair#*:}")
done
if [ "${#need[@]}" -eq 0 ]; then
  echo "setup-cluster-deps: slurm, munge and iproute2 already installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup-cluster-deps: missing ${need[*]} and not root; the cluster tests will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# keep the packages' init scripts from starting munged/slurmctld/slurmd during the install
made_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  made_policy=1
fi
trap 'if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge iproute2 util-linux >/dev/null
echo "setup-cluster-deps: installed ${need[*]}"
