#!/usr/bin/env bash
# Submit one midiforge stage to a running Ray cluster's job server (`ray job submit`), with jobs/runtime_env.yaml.
#
#   export RAY_ADDRESS=http://HEAD:8265                    # the head's job server (its dashboard port)
#   export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=...          # the cluster's token (see cluster/start-head.sh)
#   jobs/submit.sh preprocess SRC DEST [flags]             # or: jobs/preprocess.sh SRC DEST [flags]
#
# The job's driver runs on the head and joins the cluster itself (Ray sets RAY_ADDRESS there); `midiforge` must be
# on the cluster's PATH (cluster/start-head.sh and the images in cluster/ see to that; MIDIFORGE_REMOTE overrides the
# command). Resubmitting a failed or stopped job continues it (preprocess and generate get --resume; train resumes
# from its backup by itself).
# Waits for the job and prints its logs; exit status 0 only if the job SUCCEEDED. RAY_JOB_ID names the submission
# (default: midiforge-STAGE-<time>), --no-wait via RAY_JOB_NO_WAIT=1.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
stage="${1:?usage: jobs/submit.sh preprocess|train|generate ARGS...}"; shift
case "$stage" in preprocess|train|generate) ;; *) echo "jobs/submit.sh: unknown stage '$stage'" >&2; exit 2;; esac
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster job server, e.g. http://HEAD:8265}"
if [ -n "${MIDIFORGE_VENV:-}" ]; then ray="$MIDIFORGE_VENV/bin/ray"
elif command -v ray >/dev/null; then ray="$(command -v ray)"
else ray="$here/../.venv/bin/ray"; fi
[ -x "$ray" ] || { echo "jobs/submit.sh: 'ray' not found: set MIDIFORGE_VENV, activate the venv, or run make" >&2; exit 2; }
id="${RAY_JOB_ID:-midiforge-$stage-$(date -u +%Y%m%d-%H%M%S)}"
wait=(); [ -n "${RAY_JOB_NO_WAIT:-}" ] && wait=(--no-wait)
# preprocess and generate: --resume (a resubmitted job continues); train continues from its backup by itself and
# prints a line per epoch when not on a terminal
extra=(--resume --no-progress); [ "$stage" = train ] && extra=()
rc=0
"$ray" job submit --address "$RAY_ADDRESS" --submission-id "$id" --runtime-env "$here/runtime_env.yaml" \
  ${wait[@]+"${wait[@]}"} -- "${MIDIFORGE_REMOTE:-midiforge}" "$stage" "$@" ${extra[@]+"${extra[@]}"} || rc=$?
[ -n "${RAY_JOB_NO_WAIT:-}" ] && exit "$rc"
status="$("$ray" job status --address "$RAY_ADDRESS" "$id" 2>&1 | grep -o -i 'succeeded\|failed\|stopped' | tail -1 || true)"
status="$(echo "$status" | tr a-z A-Z)"
echo "jobs/submit.sh: job $id ${status:-status unknown}"
[ "$rc" = 0 ] && [ "$status" = SUCCEEDED ]
