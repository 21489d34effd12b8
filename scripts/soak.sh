#!/usr/bin/env bash
# The soak: sidecar processes under steady load for DURATION (e.g. 2m, 60m, 1h, 900s) with a
# fault every few minutes, in turn from the reliability harness's list; the ledgers are checked
# as the fault rows check them, and each sidecar's memory, open files and threads and the store's
# keys are sampled. Writes the soak section of docs/RELIABILITY.md and docs/soak.svg
# (SOAK_OUT=none to write nothing; SOAK_KEEP=DIR to keep every process's log).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 1 ]; then
  echo "usage: scripts/soak.sh DURATION   (e.g. 2m, 60m, 1h, 900s)" >&2
  exit 2
fi
case "$1" in
  *h) seconds=$(( ${1%h} * 3600 )) ;;
  *m) seconds=$(( ${1%m} * 60 )) ;;
  *s) seconds=${1%s} ;;
  *[!0-9]*|"") echo "soak.sh: DURATION is a number with h, m or s, e.g. 60m (got '$1')" >&2; exit 2 ;;
  *) seconds=$1 ;;
esac
scripts/bootstrap.sh
args=(--duration "$seconds" --command "scripts/soak.sh $1")
if [ "${SOAK_OUT:-docs/RELIABILITY.md}" != none ]; then
  args+=(--out "${SOAK_OUT:-docs/RELIABILITY.md}")
fi
if [ -n "${SOAK_KEEP:-}" ]; then
  args+=(--keep "$SOAK_KEEP")
fi
exec .venv/bin/python -m tests.chaos.soak "${args[@]}"
