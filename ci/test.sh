#!/usr/bin/env bash
# The README's test command: install what is missing, build with
# AddressSanitizer + UndefinedBehaviorSanitizer and warnings as errors, and run
# the whole suite. Every integration test makes its own SoftHSM2 token in a
# temporary folder; nothing outside build/ and /tmp is touched.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/install-deps.sh
cmake --workflow --preset test
