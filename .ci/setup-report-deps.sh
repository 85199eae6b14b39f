#!/usr/bin/env bash
# What the report tests (tests/test_report.py) need on a Debian machine, as root: Chromium (the page is loaded in
# real headless Chromium), a General MIDI SoundFont and FluidSynth (the audio players). Idempotent: installs only
# what is missing; without root it says so and the tests that need these skip with their reason.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v fluidsynth >/dev/null 2>&1 || need+=(fluidsynth)
[ -e /usr/share/sounds/sf2/FluidR3_GM.sf2 ] || need+=(fluid-soundfont-gm)
[ -e /usr/share/sounds/sf2/TimGM6mb.sf2 ] || need+=(timgm6mb-soundfont)
if [ "${#need[@]}" -eq 0 ]; then
  echo "setup-report-deps: chromium, fluidsynth and the SoundFonts already installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup-report-deps: missing ${need[*]} and not root; the tests that need them will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "setup-report-deps: installed ${need[*]}"
