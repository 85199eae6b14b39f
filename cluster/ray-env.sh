# Sourced by start-head.sh and start-worker.sh (not run on its own).
#
# Finds `ray`: $MIDIFORGE_VENV/bin/ray, else `ray` on PATH, else this repository's .venv/bin/ray (what
# `make` creates). Its directory goes first on PATH, so that the Ray processes and the jobs they run
# (`ray job submit -- midiforge ...`) use the same install: `midiforge`, `python`, `ray`.
#
# Turns Ray's token authentication on (RAY_AUTH_MODE=token). The token is RAY_AUTH_TOKEN if set, else
# the file RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token), which every node and every driver needs.

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

if [ -n "${MIDIFORGE_VENV:-}" ]; then
  ray_bin="$MIDIFORGE_VENV/bin/ray"
  [ -x "$ray_bin" ] || die "MIDIFORGE_VENV=$MIDIFORGE_VENV has no bin/ray (it should be the venv midiforge is installed in)"
elif ray_bin="$(command -v ray)"; then
  :
elif [ -x "$(dirname "${BASH_SOURCE[0]}")/../.venv/bin/ray" ]; then
  ray_bin="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.venv/bin" && pwd)/ray"
else
  die "ray not found: set MIDIFORGE_VENV to the venv midiforge is installed in, put ray on PATH, or run make (creates .venv)"
fi
PATH="$(dirname "$ray_bin"):$PATH"
export PATH

export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  export RAY_AUTH_TOKEN_PATH
fi
