#!/usr/bin/env bash
# Run every fault with 10,000 messages (by default) and regenerate docs/RELIABILITY.md; then the
# long fuzz profile (scripts/fuzz.sh, FUZZ_EXAMPLES=400 by default) and docs/FUZZING.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
rc=0
.venv/bin/python -m tests.chaos.report "$@" || rc=$?
if [ "${SKIP_FUZZ:-0}" != 1 ]; then
  scripts/fuzz.sh || rc=$?
fi
exit "$rc"
