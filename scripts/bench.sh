#!/usr/bin/env bash
# The benchmark command: set everything up, then measure the sidecar against the raw
# confluent-kafka client in one run and rewrite docs/BENCHMARKS.md (+ .png, bench/results.json).
# Not part of the test suite: speed is measured here, never asserted in tests.
#   scripts/bench.sh [bench/runner.py's options]     the whole benchmark
#   scripts/bench.sh --per-call [options]          only the per-call paths (bench/scenarios/percall.py)
#   scripts/bench.sh --queue [options]             only queue mode (bench/scenarios/queue.py)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/python -m pip install -q "matplotlib>=3.8"
if [ "${1:-}" = "--per-call" ]; then
  shift
  exec .venv/bin/python -m bench.scenarios.percall "$@"
fi
if [ "${1:-}" = "--queue" ]; then
  shift
  exec .venv/bin/python -m bench.scenarios.queue "$@"
fi
exec .venv/bin/python -m bench "$@"
