#!/usr/bin/env bash
# Regenerate docs/DASHBOARD.png from a real run's scraped metrics (bench/tools/dashboard.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m bench.tools.dashboard "$@"
