#!/usr/bin/env bash
# The README's test command: install what is missing, build with
# AddressSanitizer + UndefinedBehaviorSanitizer and warnings as errors, and run
# the whole suite. Every integration test makes its own SoftHSM2 token in a
# temporary folder; nothing outside build/ and /tmp is touched.
#
# The `dev` test preset runs three tests at a time on two cores: a quarter of
# the suite's time is tests waiting (a stop watchdog, a hung token's
# deadline, a server's restart), not computing. Measured on 2 cores: 567 s
# at two at a time, 490 s at three, every test passing in both.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/install-deps.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cmake --workflow --preset test 2>&1 | tee "$log"
# In CI a skipped test is a failure: every component a test may skip for
# (swtpm, systemd-analyze, ...) is installed by ci/install-deps.sh, so a
# skip means a missing part, and a green run must not hide it.
if [[ -n "${CI:-}" && "${CI}" != "false" && "${CI}" != "0" ]] && grep -q '(Skipped)' "$log"; then
  echo "test: tests were skipped in CI (each needs a component install-deps.sh provides):" >&2
  grep '(Skipped)' "$log" >&2
  exit 1
fi
