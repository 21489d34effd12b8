#!/usr/bin/env bash
# Regenerate docs/DASHBOARD.png from a real run's scraped metrics (bench/dashboard.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python bench/dashboard.py "$@"
