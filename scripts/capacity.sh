#!/usr/bin/env bash
# Measure what the Redis store costs (bytes per key, Redis CPU and round trips per record) and the
# rates of its shapes (one node, Cluster, WAIT) against the raw client; writes bench/capacity.json,
# which docs/CAPACITY.md quotes. Not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m bench.scenarios.capacity "$@"
