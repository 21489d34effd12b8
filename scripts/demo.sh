#!/usr/bin/env bash
# The README's demo command: set everything up, then run the sidecar against a local Kafka and
# Redis with a small app that publishes deliberate duplicates and reports delivered vs skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python demo/run_demo.py "$@"
