#!/usr/bin/env bash
# The benchmark command: set everything up, then measure the sidecar against the raw
# confluent-kafka client in one run and rewrite docs/BENCHMARKS.md (+ .png, bench/results.json).
# Not part of the test suite: speed is measured here, never asserted in tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/python -m pip install -q "matplotlib>=3.8"
exec .venv/bin/python bench/run.py "$@"
